"""Teacher throughput against an older commit: the demo config's teacher stage, now and at REF.

In one run, on the same machine: `raydistill train` on configs/demo.yaml (the data stage, then
the teacher: resnet10t, ZeRO-3 on 2 Ray Train workers over gloo, the demo's augmentation
streamed by Ray Data), with this tree's code and with the code of commit REF (a git worktree,
first on PYTHONPATH of the child process, with its own configs/demo.yaml), each on a local Ray
of its own. The figure is the teacher's `samples_per_s` from its summary.json (training steps
only: Ray Train's start, DeepSpeed's set-up and evaluation are outside it). The variants are
interleaved, --repeats times each (2; 1 with --quick), and the best run of each counts.
--epochs sets teacher.epochs for both (default: the config's; 2 with --quick).

Target: now >= 0.95x REF.

    python bench/teacher_regression.py [--against REF] [--quick] [--repeats N] [--epochs E]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO, Bench, best, interleave, worktree


def teacher_run(root: Path, lib: Path, epochs: int | None) -> dict:
    """`raydistill train` of the demo config with the code under `lib` (and the config under
    `root`), in a child process; the teacher summary's throughput and time."""
    with tempfile.TemporaryDirectory() as storage:
        sets = ["--set", "sweep.num_trials=0"] + (["--set", f"teacher.epochs={epochs}"] if epochs else [])
        cmd = [sys.executable, "-m", "raydistill.cli", "train", "--config", str(root / "configs" / "demo.yaml"),
               "--storage", storage, "--name", "bench", *sets]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")])}
        env.pop("RAY_ADDRESS", None)  # a local Ray of its own, not a head elsewhere on the machine
        out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"raydistill train with {lib} failed:\n{out.stderr[-3000:]}")
        summary = json.loads((Path(storage) / "bench" / "teacher" / "summary.json").read_text())
    return {"samples_per_s": summary["samples_per_s"], "train_time_s": summary.get("train_time_s"),
            "steps": summary["steps"], "accuracy": summary["accuracy"]}


def main() -> int:
    bench = Bench("teacher_regression", __doc__, target="teacher samples/s now >= 0.95x at REF (demo config)",
                  repeats=(2, 1))
    bench.parser.add_argument("--against", metavar="REF", default="HEAD~1",
                              help="the older commit (default HEAD~1, the one before this)")
    bench.parser.add_argument("--epochs", type=int, default=None, help="teacher.epochs for both runs")
    args = bench.parse()
    epochs = args.epochs or (2 if args.quick else None)
    with worktree(args.against) as (sha, old_lib):
        runs = interleave({"before": lambda: teacher_run(old_lib.parent, old_lib, epochs),
                           "now": lambda: teacher_run(REPO, REPO / "lib", epochs)}, args.repeats)
    chosen = {name: best(rs, "samples_per_s") for name, rs in runs.items()}
    ratio = chosen["now"]["samples_per_s"] / chosen["before"]["samples_per_s"]
    print(f"\nteacher samples/s now {chosen['now']['samples_per_s']:.1f} vs {chosen['before']['samples_per_s']:.1f} "
          f"at {sha[:12]} ({ratio:.3f}x; best of {args.repeats}, interleaved)")
    bench.finish(met=ratio >= 0.95,
                 figures={"against": sha, "ratio": ratio, "best": chosen,
                          "runs_samples_per_s": {n: [r["samples_per_s"] for r in rs] for n, rs in runs.items()}},
                 compare={name: chosen[name]["samples_per_s"] for name in ("before", "now")},
                 unit=f"teacher samples/s (before: {sha[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
