"""Data scale: does memory stay flat when the data set grows tenfold?

Two Parquet data sets of 64x64 RGB images are written here, of 10,000 and 100,000 rows (--quick:
2,000 and 20,000): an `image` column of PNG bytes and an int64 `label` column (10 classes), in
row groups of 1,000 rows. Each image is a learnable class pattern on random colours: a sine
grating whose orientation is the class (18 degrees apart, +-3 degrees of jitter), of random
frequency, phase and two random colours, plus pixel noise.

On each, one teacher stage runs as a user runs it, as a subprocess on this machine with
RAY_ADDRESS unset (so the driver starts its own local Ray):

    raydistill train --config configs/demo.yaml --storage TMP --name scaleN
        --set data.source=FILE --set data.image_size=64 --set data.channels=3
        --set teacher.arch=test_resnet --set teacher.epochs=1 --set sweep.num_trials=0

(the demo's other settings: 2 Ray Train workers of 0.75 CPU, ZeRO-3, augmentation tasks of
0.25 CPU, the demo's augmentation). The data stage (Ray Data tasks read, check, split and store
the rows) and one teacher epoch over the training split (about 70% of the rows), its
validation and test evaluation.

Measured, sampling with psutil every 0.2 s: the peak RSS of the driver (the raydistill
process) and of each Ray Train worker (the processes under it whose command line names
RayTrainWorker: the actors its raylet started); RSS counts the pages of Ray's shared object
store a process has touched, so RSS minus shared pages is printed beside. From the run's
records: the data stage's time (manifest.json) and rows/s, the rows read and per split
(data/summary.json), the teacher's samples/s, training time and test accuracy
(teacher/summary.json).

Targets: the driver's peak RSS at the large set <= 1.25x its peak at the small set and less than
300 MB above it; every Train worker's peak RSS at the large set <= 1.25x at the small set (the
workers' peaks paired largest to largest).

    python bench/data_scale.py [--quick] [--sizes 10000,100000] [--keep] [--timeout 3600]
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from harness import Bench

REPO = Path(__file__).resolve().parents[1]
SIDE, CLASSES, ROWS_PER_GROUP = 64, 10, 1000
SETS = ["data.image_size=64", "data.channels=3", "teacher.arch=test_resnet", "teacher.epochs=1", "sweep.num_trials=0"]
DRIVER_RATIO, DRIVER_DELTA_MB, WORKER_RATIO = 1.25, 300.0, 1.25


# ---- the data sets ---------------------------------------------------------------------------


def image_chunk(seed: int, chunk: int, rows: int) -> tuple[list[bytes], np.ndarray]:
    """One row group: `rows` PNG-encoded images and their labels, drawn from (seed, chunk)."""
    from PIL import Image

    rng = np.random.default_rng((seed, chunk))
    labels = rng.integers(0, CLASSES, rows)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    theta = labels * (np.pi / CLASSES) + rng.uniform(-0.05, 0.05, rows)
    freq = rng.uniform(2.5, 5.0, rows)
    phase = rng.uniform(0, 2 * np.pi, rows)
    wave = np.sin(2 * np.pi * freq[:, None, None] * (xx * np.cos(theta)[:, None, None] + yy * np.sin(theta)[:, None, None])
                  + phase[:, None, None])
    low, high = rng.uniform(0, 255, (rows, 3)), rng.uniform(0, 255, (rows, 3))
    mix = (wave[:, None] + 1) / 2  # (rows, 1, S, S) on 0..1
    img = low[:, :, None, None] + (high - low)[:, :, None, None] * mix + rng.normal(0, 6, (rows, 3, SIDE, SIDE))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    cells = []
    for one in img:
        buf = io.BytesIO()
        Image.fromarray(one.transpose(1, 2, 0)).save(buf, format="PNG", compress_level=1)
        cells.append(buf.getvalue())
    return cells, labels.astype(np.int64)


def _chunk(job: tuple[int, int, int]):
    return image_chunk(*job)


def write_source(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` images as Parquet (row groups of ROWS_PER_GROUP), encoded on every core."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
    jobs = [(seed, i, min(ROWS_PER_GROUP, rows - start)) for i, start in enumerate(range(0, rows, ROWS_PER_GROUP))]
    tmp = path.with_suffix(".tmp")
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 2) as pool, pq.ParquetWriter(tmp, schema) as writer:
        for cells, labels in pool.imap(_chunk, jobs):
            writer.write_table(pa.table({"image": pa.array(cells, type=pa.binary()), "label": pa.array(labels)}, schema=schema))
    os.replace(tmp, path)
    return path


# ---- memory of a run's processes -------------------------------------------------------------


class PeakRSS:
    """Every `every_s` seconds: the RSS (and RSS minus shared pages) of the driver and of every
    process under it whose command line names RayTrainWorker; keeps each one's peak. A Train
    worker is such a process started by the raylet (an actor); one whose parent is itself a
    Train worker is a fork of it (its copy-on-write pages count in its RSS too) and is kept
    apart, as `train_worker_fork`, out of the verdict."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self.driver = psutil.Process(pid)
        self.peaks: dict[int, dict] = {}  # pid -> {"role", "rss", "private", "first_s", "last_s", ...}
        self.samples = 0
        self.start = time.time()
        self.timeline: list[tuple] = []  # (seconds since start, driver RSS, largest Train worker RSS), bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _note(self, proc, role: str, now: float, **extra) -> int:
        mem = proc.memory_info()
        peak = self.peaks.setdefault(proc.pid, {"role": role, "rss": 0, "private": 0, "first_s": now - self.start,
                                                **extra})
        peak["rss"] = max(peak["rss"], mem.rss)
        peak["private"] = max(peak["private"], mem.rss - mem.shared)
        peak["last_s"] = now - self.start
        return mem.rss

    def sample(self) -> None:
        import psutil

        now = time.time()
        try:
            driver = self._note(self.driver, "driver", now)
            children = self.driver.children(recursive=True)
        except psutil.Error:  # the driver has exited
            return
        named = []  # (process, command line, parent pid) of those naming RayTrainWorker
        for proc in children:
            try:
                cmdline = " ".join(proc.cmdline())
                if "RayTrainWorker" in cmdline:
                    named.append((proc, cmdline, proc.ppid()))
            except psutil.Error:  # gone between the listing and the read
                continue
        named_pids = {proc.pid for proc, _, _ in named}
        worker = 0
        for proc, cmdline, ppid in named:
            try:
                if ppid in named_pids or self.peaks.get(ppid, {}).get("role") == "train_worker":
                    self._note(proc, "train_worker_fork", now, parent=ppid, cmdline=" ".join(cmdline.split())[:200])
                else:
                    worker = max(worker, self._note(proc, "train_worker", now))
            except psutil.Error:
                continue
        self.samples += 1
        self.timeline.append((now - self.start, driver, worker))

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mb = 2**20
        driver = next((p for p in self.peaks.values() if p["role"] == "driver"), {"rss": 0, "private": 0})
        workers = sorted((p for p in self.peaks.values() if p["role"] == "train_worker"), key=lambda p: -p["rss"])
        forks = [p for p in self.peaks.values() if p["role"] == "train_worker_fork"]
        return {"driver_peak_rss_mb": driver["rss"] / mb, "driver_peak_private_mb": driver["private"] / mb,
                "worker_peak_rss_mb": [p["rss"] / mb for p in workers],
                "worker_peak_private_mb": [p["private"] / mb for p in workers],
                "worker_forks": [{"rss_mb": p["rss"] / mb, "seen_s": [p["first_s"], p["last_s"]], "cmdline": p["cmdline"]}
                                 for p in forks],
                "samples": self.samples}

    def print_timeline(self, label: str, marks: dict[str, float], every_s: float = 10.0) -> None:
        """The largest RSS in each `every_s` window, driver and Train worker, and when `marks`
        (name -> epoch seconds) fell: where in the run the memory went."""
        mb, window = 2**20, {}
        for t, driver, worker in self.timeline:
            w = window.setdefault(int(t // every_s), [0, 0])
            w[0], w[1] = max(w[0], driver), max(w[1], worker)
        rows = [f"{int(k * every_s)}s {d / mb:.0f}/{w / mb:.0f}" for k, (d, w) in sorted(window.items())]
        when = ", ".join(f"{name} at {t - self.start:.0f}s" for name, t in marks.items())
        print(f"[data_scale] {label}: RSS MB (driver/largest Train worker), max per {every_s:.0f} s ({when}): "
              + "; ".join(rows), flush=True)


# ---- one run -----------------------------------------------------------------------------------


def run_teacher(source: Path, storage: Path, name: str, timeout: float) -> dict:
    """`raydistill train` on `source` in a subprocess; its processes' peak memory and its records."""
    cmd = [str(REPO / ".venv" / "bin" / "raydistill"), "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--storage", str(storage), "--name", name]
    for item in [f"data.source={source}", *SETS]:
        cmd += ["--set", item]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the driver starts its own local Ray, under it: what is sampled
    log_path = storage / f"{name}.log"
    storage.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = PeakRSS(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the CLI records the stage as interrupted and shuts its Ray down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
        finally:
            memory = sampler.stop()
    wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"raydistill train on {source} {'timed out' if code is None else f'exited {code}'} "
                         f"after {wall:.0f} s; log {log_path}:\n{tail}")
    run = storage / name
    manifest = json.loads((run / "manifest.json").read_text())
    data_rec = manifest["stages"]["data"]
    data_summary = json.loads((run / "data" / "summary.json").read_text())
    teacher = json.loads((run / "teacher" / "summary.json").read_text())
    data_s = data_rec["end"] - data_rec["start"]
    teacher_rec = manifest["stages"]["teacher"]
    sampler.print_timeline(name, {"data stage start": data_rec["start"], "data stage end": data_rec["end"],
                                  "teacher stage end": teacher_rec["end"]})
    return {
        **memory,
        "wall_s": wall,
        "data_stage_s": data_s,
        "data_rows_per_s": data_summary["rows_read"] / data_s,
        "rows_read": data_summary["rows_read"],
        "rows_skipped": data_summary["rows_skipped"],
        "splits": data_summary["splits"],
        "teacher_samples_per_s": teacher["samples_per_s"],
        "teacher_train_time_s": teacher["train_time_s"],
        "teacher_steps": teacher["steps"],
        "teacher_accuracy": teacher["accuracy"],
    }


def main() -> None:
    bench = Bench("data_scale", __doc__, repeats=None,
                  target=f"driver peak RSS at the large set <= {DRIVER_RATIO}x and < +{DRIVER_DELTA_MB:.0f} MB vs the "
                         f"small set; each Ray Train worker's peak RSS <= {WORKER_RATIO}x")
    parser = bench.parser
    parser.add_argument("--sizes", default=None, metavar="SMALL,LARGE",
                        help="rows of the two data sets (default 10000,100000; 2000,20000 with --quick)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each teacher run may take")
    parser.add_argument("--keep", action="store_true", help="keep the data sets and runs (their folder is printed)")
    args = bench.parse()
    sizes = [int(v) for v in (args.sizes or ("2000,20000" if args.quick else "10000,100000")).split(",")]
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
        parser.error("--sizes: two row counts, the smaller first")

    work = Path(tempfile.mkdtemp(prefix="data_scale_"))
    runs = {}
    try:
        for rows in sizes:
            start = time.perf_counter()
            source = write_source(work / f"images_{rows}.parquet", rows)
            written_s = time.perf_counter() - start
            row = run_teacher(source, work / "runs", f"scale{rows}", args.timeout)
            row.update(source_mb=source.stat().st_size / 2**20, write_s=written_s)
            runs[rows] = row
            print(f"[data_scale] {rows} rows ({row['source_mb']:.0f} MB of PNG): driver peak RSS "
                  f"{row['driver_peak_rss_mb']:.0f} MB; Train workers' peaks "
                  f"{', '.join(f'{v:.0f}' for v in row['worker_peak_rss_mb'])} MB; data stage "
                  f"{row['data_stage_s']:.1f} s ({row['data_rows_per_s']:.0f} rows/s); teacher "
                  f"{row['teacher_samples_per_s']:.0f} samples/s; wall {row['wall_s']:.0f} s", flush=True)
            if row["worker_forks"]:
                print(f"[data_scale] {rows} rows: {len(row['worker_forks'])} forks of Train workers seen (left out of "
                      f"the verdict): {json.dumps(row['worker_forks'])}", flush=True)
            source.unlink()  # the run's stored splits stay (until the end) and hold the rows
    finally:
        if args.keep:
            print(f"[data_scale] kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)

    small, large = (runs[n] for n in sizes)
    driver_ratio = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    driver_delta = large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"]
    paired = list(zip(small["worker_peak_rss_mb"], large["worker_peak_rss_mb"]))
    worker_ratios = [b / a for a, b in paired]
    same_workers = len(small["worker_peak_rss_mb"]) == len(large["worker_peak_rss_mb"]) > 0
    met = {
        "driver": driver_ratio <= DRIVER_RATIO and driver_delta < DRIVER_DELTA_MB,
        "workers": same_workers and all(r <= WORKER_RATIO for r in worker_ratios),
    }
    print(f"\n{'rows':>8} {'driver MB':>10} {'(private)':>10} {'workers MB':>16} {'(private)':>16} {'data s':>7} "
          f"{'rows/s':>7} {'train/val/test':>20} {'samples/s':>10} {'test acc':>9} {'wall s':>7}")
    for rows, r in runs.items():
        splits = "/".join(str(r["splits"][s]) for s in ("train", "val", "test"))
        print(f"{rows:>8} {r['driver_peak_rss_mb']:>10.0f} {r['driver_peak_private_mb']:>10.0f} "
              f"{' '.join(f'{v:.0f}' for v in r['worker_peak_rss_mb']):>16} "
              f"{' '.join(f'{v:.0f}' for v in r['worker_peak_private_mb']):>16} {r['data_stage_s']:>7.1f} "
              f"{r['data_rows_per_s']:>7.0f} {splits:>20} {r['teacher_samples_per_s']:>10.1f} "
              f"{r['teacher_accuracy']:>9.4f} {r['wall_s']:>7.0f}")
    print(f"\ndriver: {driver_ratio:.3f}x, {driver_delta:+.0f} MB (target <= {DRIVER_RATIO}x and < +{DRIVER_DELTA_MB:.0f} MB): "
          f"{'met' if met['driver'] else 'NOT met'}; Train workers: "
          f"{', '.join(f'{r:.3f}x' for r in worker_ratios) or 'none sampled'} (target <= {WORKER_RATIO}x each): "
          f"{'met' if met['workers'] else 'NOT met'}")
    label = {sizes[0]: f"{sizes[0]:,} rows", sizes[1]: f"{sizes[1]:,} rows"}
    compare = {f"driver, {label[n]}": runs[n]["driver_peak_rss_mb"] for n in sizes}
    compare.update({f"largest Train worker, {label[n]}": max(runs[n]["worker_peak_rss_mb"], default=0.0) for n in sizes})
    bench.finish(
        met=all(met.values()),
        figures={"targets": met, "sizes": sizes, "driver_ratio": driver_ratio, "driver_delta_mb": driver_delta,
                 "worker_ratios": worker_ratios, "sets": SETS, "runs": {str(n): r for n, r in runs.items()}},
        compare=compare,
        unit="peak RSS, MB",
    )


if __name__ == "__main__":
    main()
