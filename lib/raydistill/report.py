"""Speed and size of each model form (torch fp32, ONNX fp32, ONNX int8), and the compression
report: student/report.md plus a PNG chart.

Latency is batch-1 on one CPU thread (p50 and p99 over many runs, after warm-up); throughput
is images per second at batch 64, also on one thread, so figures compare across forms and
do not depend on how busy the other cores are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raydistill.artifacts import atomic_write, write_text


def _timed(fn: Callable[[np.ndarray], object], x: np.ndarray, runs: int, warmup: int = 5,
           budget_s: float = 30.0) -> list[float]:
    """Times of up to `runs` calls after up to `warmup` untimed ones, within about `budget_s`
    (at least one warm-up and three timed calls): a 1B-parameter teacher on one CPU thread
    takes seconds per call, and its figure needs a few calls, not a hundred."""
    start = time.perf_counter()
    for i in range(warmup):
        fn(x)
        if time.perf_counter() - start > budget_s / 4:
            break
    times: list[float] = []
    while len(times) < runs and (len(times) < 3 or sum(times) / 1e3 < budget_s):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile(fn: Callable[[np.ndarray], object], input_shape: tuple[int, ...], runs: int = 100,
            throughput_batch: int = 64, throughput_runs: int = 10) -> dict:
    """{latency_ms_p50, latency_ms_p99 (batch 1), throughput_per_s (at throughput_batch, 64 unless
    a batch would take over 3 s), latency_runs} of fn(pixels); each measurement is time-boxed
    (see _timed)."""
    rng = np.random.default_rng(0)
    one = rng.random((1, *input_shape), dtype=np.float32)
    lat = _timed(fn, one, runs)
    p50 = float(np.percentile(lat, 50))
    # A model that takes seconds per image gets a batch of a few seconds, not 64 images.
    throughput_batch = max(1, min(throughput_batch, int(3000 / max(p50, 1e-3))))
    many = rng.random((throughput_batch, *input_shape), dtype=np.float32)
    batch_ms = _timed(fn, many, throughput_runs, warmup=2)
    return {"latency_ms_p50": p50, "latency_ms_p99": float(np.percentile(lat, 99)),
            "throughput_per_s": float(throughput_batch / (np.median(batch_ms) / 1e3)), "latency_runs": len(lat),
            "throughput_batch": throughput_batch}


def torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
    """fn(pixels) for a torch classifier; call under `one_thread()`."""
    model.eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def onnx_runner(session) -> Callable[[np.ndarray], object]:
    from raydistill.compress import INPUT_NAME, OUTPUT_NAME

    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})


class one_thread:
    """torch on one intra-op thread for the duration (restored after)."""

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


# ---- report -----------------------------------------------------------------------------

COLUMNS = ("accuracy", "params", "file_bytes", "latency_ms_p50", "latency_ms_p99", "throughput_per_s")


def write_report(out_dir: Path, rows: dict[str, dict], summary: dict) -> tuple[Path, Path]:
    """student/report.md (a table, one row per model form) and student/report.png (bars)."""
    md = out_dir / "report.md"
    png = out_dir / "report.png"
    teacher = rows.get("teacher", {})
    lines = [
        "# Compression report",
        "",
        f"Teacher `{summary.get('teacher_arch')}` -> student `{summary['arch']}` "
        f"(KD T={summary['kd']['T']}, alpha={summary['kd']['alpha']}, mode {summary['kd']['mode']}"
        f"{', hint weight ' + str(summary['kd']['hint_weight']) if summary['kd'].get('hint_weight') else ''}), "
        f"pruning: {summary['pruning']['status']}.",
        "",
        "Accuracy on the held-out test split. Latency: batch 1, one CPU thread, p50/p99. "
        "Throughput: batch 64, one CPU thread.",
        "",
        "| model | accuracy | retention | params | file | p50 ms | p99 ms | images/s @64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        retention = r["accuracy"] / teacher["accuracy"] if teacher.get("accuracy") else float("nan")
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | {retention:.3f} | {r['params']:,} | {r['file_bytes'] / 1024:.0f} KiB "
            f"| {r['latency_ms_p50']:.3f} | {r['latency_ms_p99']:.3f} | {r['throughput_per_s']:.0f} |"
        )
    lines += [
        "",
        f"Retention (student / teacher accuracy): {summary['retention']:.3f}; "
        f"{summary['params_ratio']:.1f}x fewer parameters than the teacher.",
        _kd_line(summary.get("kd_effect") or {}),
        f"ONNX check: max |logit diff| vs torch {summary['onnx']['max_abs_logit_diff']:.2e} "
        f"(tolerance {summary['onnx']['tolerance']:.0e}).",
        "",
        "![chart](report.png)",
        "",
    ]
    write_text(md, "\n".join(lines))
    _chart(png, rows)
    return md, png


def _kd_line(effect: dict) -> str:
    """Whether distillation helped, from the student trained without it (student.kd_control)."""
    if "gain" not in effect:
        return f"KD effect: {effect.get('status', 'not measured')}."
    verdict = "KD helped" if effect["gain"] > 0 else "**KD did not help**"
    return (f"{verdict}: validation accuracy {effect['val_accuracy_with_kd']:.4f} with KD, "
            f"{effect['val_accuracy_without_kd']:.4f} for the same student trained on the labels alone.")


def _chart(path: Path, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    panels = (("accuracy", "test accuracy", False), ("params", "parameters", True),
              ("latency_ms_p50", "batch-1 CPU latency p50 (ms)", True), ("throughput_per_s", "images/s at batch 64", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    colors = ["#7a7a7a", "#3b75af", "#519e3e", "#ef8636", "#c53a32"][: len(names)]
    for ax, (key, title, log) in zip(axes, panels):
        values = [rows[n][key] for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
        if key == "accuracy":
            ax.set_ylim(max(0.0, min(values) - 0.05), 1.0)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
