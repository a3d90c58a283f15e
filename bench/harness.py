"""What every benchmark shares: its flags, interleaved repeats, the target verdict and the record.

A benchmark declares its terms, measures, then hands its figures over:

    bench = Bench("serve_load", __doc__, target="ours c=1 p50 <= bare + 3 ms; 0 errors", repeats=(3, 2))
    bench.parser.add_argument("--seconds", type=float, default=10)   # its own flags
    args = bench.parse()                       # --quick, --out and (with `repeats`) --repeats too
    runs = interleave({"bare": run_bare, "ours": run_ours}, args.repeats)
    bench.finish(met=gap <= 3, figures={"p50_gap_ms": gap}, compare={"bare": ..., "ours": ...}, unit="req/s")

`finish` prints the final JSON line (`{"bench", "target", "met", ...figures}`) and writes the
record to bench/results/<name>.json (<name>.quick.json for --quick, so a short run never
replaces a full one): the figures plus the commit and whether the tree was dirty, the machine
(CPU model, cores, GPU), the load average sampled through the run, and the command.
`python bench/report.py` (`make bench-report`) turns the records into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout
        gpus = [g.strip() for g in out.splitlines() if g.strip()]
    mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "gpu": ", ".join(gpus) or None,
            "python": platform.python_version(), "os": platform.platform(terse=True)}


class LoadSampler:
    """The 1-minute load average, sampled every `every_s` seconds while the benchmark runs: a
    figure measured at load 9 on 2 cores means something else than one measured idle."""

    def __init__(self, every_s: float = 5.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"start": round(s[0], 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2)}


@contextlib.contextmanager
def worktree(ref: str):
    """A checkout of `ref` beside this one (git worktree), for measuring an older commit's code
    in the same run; removed afterwards. Yields (the commit's sha, the checkout's lib/ folder),
    which a child process puts first on PYTHONPATH to import that commit's raydistill."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not sha:
        raise SystemExit(f"--against {ref}: not a commit of this repository")
    path = Path(tempfile.mkdtemp(prefix="rd-against-"))
    try:
        added = subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=REPO,
                               capture_output=True, text=True)
        if added.returncode != 0:
            raise SystemExit(f"--against {ref}: git worktree add failed: {added.stderr.strip()}")
        yield sha, path / "lib"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def interleave(variants: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each variant `repeats` times, round-robin (A B C A B C ...), so that the load drifts of a
    shared machine hit every variant alike. Returns each variant's runs in order."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            runs[name].append(measure())
    return runs


def best(runs: list[dict], key: str, higher: bool = True) -> dict:
    """The best of repeated runs by `key`: the usual answer to noise that only ever slows a run."""
    return (max if higher else min)(runs, key=lambda r: r[key])


def rounded(value, digits: int = 4):
    """Floats rounded for the record, through nested dicts and lists."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {str(k): rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


class Bench:
    def __init__(self, name: str, doc: str, target: str, repeats: tuple[int, int] | None = (1, 1)):
        """repeats: the default of --repeats (full run, --quick run); None for a bench that runs
        each variant once (or repeats over seeds of its own), which then has no --repeats flag."""
        self.name, self.target, self.repeats = name, target, repeats
        self.parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=doc,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--quick", action="store_true", help="a short run: a few minutes on 2 cores")
        if repeats is not None:
            self.parser.add_argument("--repeats", type=int, default=None,
                                     help=f"runs per variant, interleaved; the best counts (default {repeats[0]}, "
                                          f"{repeats[1]} with --quick)")
        self.parser.add_argument("--out", type=Path, default=None,
                                 help=f"record to write (default bench/results/{name}.json, "
                                      f"{name}.quick.json with --quick)")
        self.args: argparse.Namespace | None = None

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        self.args = self.parser.parse_args(argv)
        if self.repeats is not None:
            if self.args.repeats is None:
                self.args.repeats = self.repeats[1] if self.args.quick else self.repeats[0]
            if self.args.repeats < 1:
                self.parser.error("--repeats must be at least 1")
        self.command = shlex.join(["python", f"bench/{self.name}.py", *(sys.argv[1:] if argv is None else argv)])
        self.started = dt.datetime.now(dt.timezone.utc)
        self._t0 = time.perf_counter()
        self._load = LoadSampler()
        return self.args

    def record_path(self) -> Path:
        if self.args.out is not None:
            return self.args.out
        return RESULTS / f"{self.name}{'.quick' if self.args.quick else ''}.json"

    def finish(self, met: bool, figures: dict, compare: dict[str, float] | None = None,
               unit: str = "", notes: str = "") -> dict:
        """Print the final JSON line and write the record. `compare` is the side-by-side the
        report plots (label -> value, in `unit`); `figures` holds every other number."""
        line = {"bench": self.name, "target": self.target, "met": bool(met), **rounded(figures)}
        record = {
            **line,
            "compare": rounded(compare) if compare else None,
            "unit": unit,
            "notes": notes,
            "quick": bool(self.args.quick),
            "command": self.command,
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": self.started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - self._t0, 1),
            "machine": machine(),
            "load_average": self._load.stop(),
        }
        from raydistill.artifacts import write_json

        path = write_json(self.record_path(), record)
        print(json.dumps(line), flush=True)
        print(f"record: {path}", file=sys.stderr)
        return record


# ---- data: what a bench trains or streams on, through the data stage ---------------------------


def write_image_parquet(path: Path, images, labels, rows_per_group: int = 1024, png: bool = False) -> Path:
    """uint8 images (N, C, H, W) and labels as a Parquet file the data stage reads: an `image`
    column of PNG bytes (png=True) or of flat uint8 arrays, an int64 `label` column, in row
    groups of `rows_per_group` rows (a data-stage task reads one row group)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    with pq.ParquetWriter(path, pa.schema([("image", pa.binary() if png else pa.list_(pa.uint8())),
                                           ("label", pa.int64())])) as writer:
        for start in range(0, len(labels), rows_per_group):
            chunk = images[start : start + rows_per_group]
            if png:
                from PIL import Image

                cells = []
                for img in chunk:
                    buf = io.BytesIO()
                    Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG", compress_level=1)
                    cells.append(buf.getvalue())
                column = pa.array(cells, type=pa.binary())
            else:
                flat = pa.array(chunk.reshape(-1), type=pa.uint8())
                column = pa.ListArray.from_arrays(
                    pa.array(np.arange(len(chunk) + 1, dtype=np.int32) * chunk[0].size), flat)
            writer.write_table(pa.table({"image": column, "label": pa.array(labels[start : start + rows_per_group])}))
    return path


def prepared(cfg, images, labels, workdir: Path, png: bool = False, rows_per_group: int = 1024):
    """In-memory images written as a Parquet source and run through the data stage
    (`data.prepare`: Ray Data tasks decode, check, split by cfg.seed and the config's fractions,
    and store the splits under workdir/splits). Needs a running Ray. Returns the data.Dataset."""
    from raydistill.data import prepare

    source = write_image_parquet(workdir / "source.parquet", images, labels, rows_per_group, png)
    return prepare(cfg, str(source), workdir / "splits")
