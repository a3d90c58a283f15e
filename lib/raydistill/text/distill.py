"""The text student stage: distill on Ray Train, then export and quantize in one Ray task,
and measure the student against its teacher (both as ONNX, one thread, batch 1, in turns).

The student's size is its configuration (student.layers, hidden, heads), so there is no
channel pruning here; student.prune_ratio applies to image students.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from raydistill.config import Config
from raydistill.distill import INT8_FILE, ONNX_FILE, STAGING, STUDENT_FILE, kd_effect

LATENCY_ROWS = 64


def run_student(cfg: Config, data, teacher_path: Path, teacher_accuracy: float, out_dir: Path,
                teacher_sha256: str | None = None) -> tuple[dict, list[Path]]:
    """Writes student.safetensors, student.onnx and student.int8.onnx; returns (summary, files).
    A failed attempt leaves the last good files in place (they are published together)."""
    import ray

    from raydistill.artifacts import publish
    from raydistill.text.data import UNLABELLED
    from raydistill.text.train import StudentFactory, train_text, training_splits

    scfg = cfg.student
    factory = StudentFactory.of(scfg)
    extra = {"teacher_path": str(teacher_path.resolve()), "teacher_sha256": teacher_sha256, "student_factory": factory}
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    metrics, elapsed = train_text("student", cfg, data, out_dir, extra, copy_to=staging)
    control = control_test = None
    if scfg.kd_control:
        without, _ = train_text("student", labels_only(cfg, data), data, out_dir, extra,
                                copy_to=staging / "without_kd")
        control, control_test = float(without["val_accuracy"]), float(without["test_accuracy"])
    task = ray.remote(compress_in_task).options(num_cpus=scfg.cpus_per_worker, max_retries=0)
    summary, written = ray.get(task.remote(cfg, data, teacher_path, teacher_sha256, teacher_accuracy, staging,
                                           float(metrics["val_accuracy"]), control))
    # The student in torch as trained, and the same student without KD, on the test split.
    summary.update(trained_test_accuracy=float(metrics["test_accuracy"]), test_accuracy_without_kd=control_test,
                   epochs_without_kd=labels_only(cfg, data).student.epochs if scfg.kd_control else None)
    summary.update(steps=int(metrics["steps"]), epochs=scfg.epochs, samples_per_s=float(metrics["samples_per_s"]),
                   train_time_s=round(elapsed, 2),
                   unlabelled_rows=data.rows(UNLABELLED) if UNLABELLED in training_splits(cfg, data, "student") else 0)
    published = publish(staging, out_dir, written)
    shutil.rmtree(staging, ignore_errors=True)
    return summary, published


def labels_only(cfg: Config, data) -> Config:
    """The KD control: the same student on the labels alone (alpha=1, no TinyBERT losses). It
    cannot read the unlabelled texts, so it takes more epochs over the labelled ones, as many as
    give it the distilled student's steps: KD must not win by training longer."""
    from raydistill.text.train import plan_of

    control = cfg.with_values({"student.alpha": 1.0, "student.hidden_weight": 0.0, "student.attention_weight": 0.0})
    steps, per_epoch = plan_of(cfg, data, "student").total_steps, plan_of(control, data, "student").steps_per_epoch
    return control.with_values({"student.epochs": max(cfg.student.epochs, round(steps / per_epoch))})


def compress_in_task(cfg: Config, data, teacher_path: Path, teacher_sha256: str | None, teacher_accuracy: float,
                     out_dir: Path, val_accuracy: float, val_without_kd: float | None) -> tuple[dict, list[Path]]:
    import torch

    from raydistill import report
    from raydistill.compress import onnx_session
    from raydistill.text import export
    from raydistill.text.models import load_model, param_count
    from raydistill.text.train import StudentFactory, objective_of

    torch.set_num_threads(max(1, int(cfg.student.cpus_per_worker)))
    scfg = cfg.student
    start = time.perf_counter()
    objective = objective_of(data)
    test, val = objective.arrays("test"), objective.arrays("val")
    teacher = load_model(teacher_path, teacher_sha256)
    student = load_model(out_dir / STUDENT_FILE)
    onnx_path = export.export_onnx(student, out_dir / ONNX_FILE, data.max_length)
    expected = export.torch_logits(student, test)
    fp32 = onnx_session(onnx_path)
    onnx_check = export.check_export(expected, export.onnx_logits(fp32, test), scfg.onnx_tolerance * 100,
                                     "the student's ONNX export")
    files = [out_dir / STUDENT_FILE, onnx_path]

    scores = objective.score(expected, "test")
    student_accuracy = scores["accuracy"]
    int8_accuracy = int8_val = None
    sessions = {"student_onnx": export.session_runner(fp32)}
    if scfg.quantize:
        int8_path = export.quantize_int8(onnx_path, out_dir / INT8_FILE)
        files.append(int8_path)
        int8 = onnx_session(int8_path)
        int8_scores = objective.score(export.onnx_logits(int8, test), "test")
        int8_accuracy = int8_scores["accuracy"]
        int8_val = objective.score(export.onnx_logits(int8, val), "val")["accuracy"]
        sessions["student_int8"] = export.session_runner(int8)
    with tempfile.TemporaryDirectory() as tmp:  # the teacher as ONNX too: latency is compared like for like
        teacher_onnx = onnx_session(export.export_onnx(teacher, Path(tmp) / "teacher.onnx", data.max_length))
        latency = _latency_in_turns({"teacher_onnx": export.session_runner(teacher_onnx), **sessions}, test)
    with report.one_thread(), torch.inference_mode():
        torch_latency = _latency_in_turns({"teacher": _torch_runner(teacher), "student": _torch_runner(student)},
                                          test, repeats=1)
    teacher_params, student_params = param_count(teacher), param_count(student)
    qa_scores = {}  # SQuAD's exact match and F1 beside `accuracy` (the F1)
    if cfg.is_qa:
        qa_scores = {"exact_match": scores["exact_match"], "f1": scores["f1"]}
        if scfg.quantize:
            qa_scores.update(int8_exact_match=int8_scores["exact_match"], int8_f1=int8_scores["f1"])
    summary = {
        "task": cfg.task,
        "arch": f"bert L{scfg.layers} H{scfg.hidden} A{scfg.heads}",
        "init": StudentFactory.of(scfg).plan(teacher.config),
        "params_total": student_params,
        "accuracy": student_accuracy,
        **qa_scores,
        "teacher_accuracy": teacher_accuracy,
        "retention": student_accuracy / teacher_accuracy if teacher_accuracy else None,
        "params_ratio": teacher_params / student_params,
        "latency_ms_p50": torch_latency,
        "latency_ms_p50_exported": latency,
        "latency_ratio_onnx": latency["teacher_onnx"] / latency["student_onnx"],
        "kd": {"T": scfg.temperature, "alpha": scfg.alpha, "hidden_weight": scfg.hidden_weight,
               "attention_weight": scfg.attention_weight},
        "kd_effect": kd_effect(val_accuracy, val_without_kd),
        "majority_accuracy": data.majority("test"),
        "majority_val_accuracy": data.majority("val"),
        "pruning": {"status": "off (a text student's size is its configuration)", "ratio": 0.0},
        "onnx": onnx_check,
        "val_accuracy": val_accuracy,
        "int8_accuracy": int8_accuracy,
        "int8_val_accuracy": int8_val,
        "compress_time_s": round(time.perf_counter() - start, 2),
    }
    return summary, files


def _torch_runner(model):
    import torch

    def run(feed):
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return run


def _latency_in_turns(runners: dict, arrays: dict, repeats: int = 3) -> dict[str, float]:
    """Median batch-1 latency (ms) of each runner (feed dict -> output) over the first test
    rows, each cut to its own length, alternating between the runners row by row so that a
    noisy neighbour slows them all alike."""
    from raydistill.text.export import INPUTS

    times = {name: [] for name in runners}
    n = min(LATENCY_ROWS, len(arrays["input_ids"]))
    for _ in range(repeats):
        for i in range(n):
            length = max(1, int(arrays["attention_mask"][i].sum()))
            feed = {k: arrays[k][i : i + 1, :length].astype(np.int64) for k in INPUTS}
            for name, run in runners.items():
                t0 = time.perf_counter()
                run(feed)
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}
