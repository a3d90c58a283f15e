"""Teacher training across Ray nodes: 2 one-CPU nodes against one 2-CPU node, in one run.

Both layouts are real Ray clusters of `ray start` processes on this machine
(raydistill.testing.localcluster: token auth, own ports and temp dirs), given the same 2 CPUs:
  - baseline: one node with 2 CPUs (both Ray Train workers and the Ray Data tasks share one
    raylet and one object store),
  - ours:     a 1-CPU head + a 1-CPU worker node; the 2 workers (0.75 CPU each) cannot share a
    node, so each rank is on its own node: augmented batches cross object stores and the ZeRO-3
    collectives cross raylets, as on a real multi-node cluster (minus the network).
The teacher stage of configs/demo.yaml (resnet10t, ZeRO-3 over gloo, digits) goes in through
`ray job submit` each time; figures come from teacher/summary.json and the job's wall time.
Layouts alternate (A B A B ...), --repeats times each (2; 1 with --quick, which also trains 2
epochs instead of --epochs 4), so the load of a shared machine hits both alike; the median
of each layout's runs counts.

Then, unless --no-loss: the 2-node layout again, with the worker node's raylet SIGKILLed after
the second checkpoint and a new node started once the head has noticed (recovery times).

Target: 2 one-CPU nodes reach >= 0.8x the samples/s of one 2-CPU node (what crossing nodes
costs on one machine; across real machines the network adds to it, see docs/scaling.md).

    python bench/multinode.py [--quick] [--repeats N] [--epochs 4] [--no-loss]
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

from harness import Bench, interleave

from raydistill.testing.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "one node, 2 CPUs (baseline)": (2, []),
    "2 nodes, 1 CPU each (ours)": (1, [1]),
}
TARGET = 0.8


def run_layout(name: str, epochs: int, index: int) -> dict:
    head_cpus, workers = LAYOUTS[name]
    started = time.perf_counter()
    with LocalCluster.temporary(head_cpus=head_cpus) as cluster:
        for cpus in workers:
            cluster.add_node(cpus)
        nodes = len(cluster.alive_nodes())
        up_s = time.perf_counter() - started
        storage = cluster.root / "storage"
        sets = [f"teacher.epochs={epochs}", "teacher.cpus_per_worker=0.75", "data.cpus_per_task=0.25"]
        job_start = time.perf_counter()
        cluster.submit(f"bench-{index}", [
            "python", "jobs/train.py", "--config", "configs/demo.yaml", "--storage", str(storage),
            "--name", "bench", *[a for s in sets for a in ("--set", s)]], cwd=REPO, wait=True)
        job_s = time.perf_counter() - job_start
        summary = json.loads((storage / "bench" / "teacher" / "summary.json").read_text())
    return {"layout": name, "nodes": nodes, "cluster_up_s": round(up_s, 1), "job_s": round(job_s, 1),
            "train_time_s": summary["train_time_s"], "samples_per_s": round(summary["samples_per_s"], 1),
            "steps": summary["steps"], "accuracy": summary["accuracy"],
            "params_per_rank": summary["params_per_rank"]}


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("teacher/ray/teacher-*/checkpoint_*") if p.is_dir())


def run_with_node_loss(epochs: int, index: int) -> dict:
    """2 one-CPU nodes; after 2 checkpoints the worker node's raylet is SIGKILLed, and a new node
    joins once the head has noticed. Times the recovery as a user sees it."""
    with LocalCluster.temporary(head_cpus=1) as cluster:
        second = cluster.add_node(1)
        storage = cluster.root / "storage"
        run_dir = storage / "bench"
        sets = [f"teacher.epochs={epochs}", "teacher.cpus_per_worker=0.75", "data.cpus_per_task=0.25",
                "teacher.checkpoint_every_steps=3", "teacher.keep_checkpoints=2"]
        job_id = f"bench-loss-{index}"
        job_start = time.perf_counter()
        cluster.submit(job_id, ["python", "jobs/train.py", "--config", "configs/demo.yaml", "--storage",
                                str(storage), "--name", "bench", *[a for s in sets for a in ("--set", s)]], cwd=REPO)
        while len(_checkpoints(run_dir)) < 2:
            if time.perf_counter() - job_start > 900:
                raise RuntimeError("no checkpoint after 15 minutes")
            time.sleep(0.5)
        killed_at = time.perf_counter()
        second.kill_raylet()
        cluster.wait_for_nodes(1)
        noticed_s = time.perf_counter() - killed_at
        cluster.add_node(1)
        replaced_s = time.perf_counter() - killed_at
        while (state := cluster.job_status(job_id)) in ("PENDING", "RUNNING"):
            time.sleep(2)
        done_s = time.perf_counter() - killed_at
        if state != "SUCCEEDED":
            raise RuntimeError(f"the job {state} after the node loss")
        summary = json.loads((run_dir / "teacher" / "summary.json").read_text())
    return {"layout": "2 nodes, one lost mid-run", "job_s": round(time.perf_counter() - job_start, 1),
            "loss_noticed_s": round(noticed_s, 1), "node_replaced_s": round(replaced_s, 1),
            "kill_to_end_s": round(done_s, 1), "restarts": summary["restarts"], "steps": summary["steps"],
            "train_time_s": summary["train_time_s"], "samples_per_s": round(summary["samples_per_s"], 1),
            "accuracy": summary["accuracy"]}


def main() -> None:
    bench = Bench("multinode", __doc__, repeats=(2, 1),
                  target=f"2 one-CPU nodes >= {TARGET}x the teacher samples/s of one 2-CPU node")
    bench.parser.add_argument("--epochs", type=int, default=4, help="teacher epochs per job (2 with --quick)")
    bench.parser.add_argument("--no-loss", action="store_true", help="skip the run that loses a node mid-way")
    args = bench.parse()
    if args.quick:
        args.epochs = 2

    jobs = itertools.count()

    def measure(name: str) -> dict:
        row = run_layout(name, args.epochs, next(jobs))
        print(f"[multinode] {name}: {row['samples_per_s']} samples/s, train {row['train_time_s']} s, "
              f"job {row['job_s']} s", flush=True)
        return row

    by_layout = interleave({name: lambda name=name: measure(name) for name in LAYOUTS}, args.repeats)
    runs = [row for rows in by_layout.values() for row in rows]

    loss = None if args.no_loss else run_with_node_loss(args.epochs, next(jobs))
    if loss:
        print(f"[multinode] node loss: noticed in {loss['loss_noticed_s']} s, job done {loss['kill_to_end_s']} s "
              f"after the kill, restarts {loss['restarts']}", flush=True)

    med = {name: {k: statistics.median(r[k] for r in runs if r["layout"] == name)
                  for k in ("samples_per_s", "train_time_s", "job_s", "cluster_up_s", "accuracy")}
           for name in LAYOUTS}
    base, ours = (med[n]["samples_per_s"] for n in LAYOUTS)
    ratio = ours / base
    print(f"\nteacher resnet10t, ZeRO-3, 2 Ray Train workers x 0.75 CPU, digits, {args.epochs} epochs, "
          f"median of {args.repeats}\n")
    print(f"{'layout':30} {'samples/s':>10} {'vs base':>8} {'train s':>8} {'job s':>7} {'cluster up s':>13} {'test acc':>9}")
    for name, m in med.items():
        print(f"{name:30} {m['samples_per_s']:10.1f} {m['samples_per_s'] / base:7.2f}x {m['train_time_s']:8.1f} "
              f"{m['job_s']:7.1f} {m['cluster_up_s']:13.1f} {m['accuracy']:9.4f}")

    two_nodes = med["2 nodes, 1 CPU each (ours)"]
    if loss:
        print(f"\nlosing the worker node after 2 checkpoints (of every 3 steps): the head noticed in "
              f"{loss['loss_noticed_s']} s, a new node was up {loss['node_replaced_s']} s after the kill, the job "
              f"ended {loss['kill_to_end_s']} s after it; {loss['restarts']} restart, {loss['steps']} steps (as "
              f"uninterrupted); job {loss['job_s']} s vs {two_nodes['job_s']} s uninterrupted")
    bench.finish(
        met=ratio >= TARGET,
        figures={
            "ratio": ratio,
            "epochs": args.epochs, "repeats": args.repeats,
            "median": med,
            "node_loss": loss,
            "samples_per_s_all_runs": {name: [r["samples_per_s"] for r in rows] for name, rows in by_layout.items()},
        },
        compare={name: m["samples_per_s"] for name, m in med.items()},
        unit="teacher samples/s (median of runs)",
    )


if __name__ == "__main__":
    main()
