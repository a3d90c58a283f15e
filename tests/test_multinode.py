"""Two Ray nodes on this machine, as on a real cluster: a head and a worker node, each its own
`ray start` with 1 CPU, token auth on. The teacher stage goes in through `ray job submit`; its
2 Ray Train workers (0.75 CPU each) cannot share a 1-CPU node, so they land on different
nodes. Mid-run the worker node's raylet is SIGKILLed (the node is lost, as when a machine
dies), a fresh node joins, and the job recovers from the checkpoint on shared storage.
Only the processes this test started are stopped.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from raydistill.testing.localcluster import LocalCluster
from raydistill.training import StepPlan

from conftest import BIN, REPO
from ray_internals import registered_checkpoint

pytestmark = pytest.mark.e2e

# 2 epochs of 9 steps on the digits' 1,258 training rows; a checkpoint every 3 steps.
KEEP = 2
SETS = ["teacher.epochs=2", "teacher.checkpoint_every_steps=3", f"teacher.keep_checkpoints={KEEP}",
        "teacher.max_failures=3", "teacher.cpus_per_worker=0.75", "data.cpus_per_task=0.25"]
TOTAL_STEPS = StepPlan.of(1258, 2, 64, 2).total_steps
TRAIN_WORKER = "ray::RayTrainWorker"


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("teacher/ray/teacher-*/checkpoint_*") if p.is_dir())


def _where_workers_run(cluster: LocalCluster) -> dict[str, int]:
    """Train workers per live node (that has any), found in each node's own process tree."""
    counts = {node.name: len(node.workers_named(TRAIN_WORKER)) for node in cluster.nodes if node.alive()}
    return {name: n for name, n in counts.items() if n}


@pytest.fixture
def cluster():
    with LocalCluster.temporary(head_cpus=1) as c:
        yield c


def test_teacher_spans_two_nodes_and_survives_losing_one(cluster, tmp_path):
    second = cluster.add_node(num_cpus=1)
    storage = tmp_path / "shared"  # every node of this one-machine cluster sees it: shared storage
    cmd = ["python", "jobs/train.py", "--config", "configs/demo.yaml", "--storage", str(storage), "--name", "mn"]
    cluster.submit("mn-teacher", [*cmd, *[a for s in SETS for a in ("--set", s)]], cwd=REPO)
    run_dir = storage / "mn"

    # Before the loss: one worker on each node, and checkpoints landing in the shared storage.
    seen: list[dict[str, int]] = []  # snapshots of {node: train workers}
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (len(_checkpoints(run_dir)) >= 2 and registered_checkpoint(run_dir)):
        seen.append(_where_workers_run(cluster))
        time.sleep(0.5)
    assert registered_checkpoint(run_dir), cluster.ray("job", "logs", "mn-teacher").stdout[-3000:]
    assert {"head": 1, second.name: 1} in seen, seen[-20:]  # rank 0 and rank 1 on different nodes

    second.kill_raylet()
    cluster.wait_for_nodes(1)  # the head has noticed the loss
    replacement = cluster.add_node(num_cpus=1)  # as an autoscaler replaces a lost node

    # `ray job logs --follow` returns when the job ends; meanwhile, watch where workers run.
    log_path = tmp_path / "job.log"  # a file, not a pipe: a full pipe would stall the follower
    with open(log_path, "w") as log:
        follow = subprocess.Popen([str(BIN / "ray"), "job", "logs", "--follow", "--address", cluster.address,
                                   "mn-teacher"], env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        after: list[dict[str, int]] = []
        deadline = time.monotonic() + 600
        while follow.poll() is None and time.monotonic() < deadline:
            after.append(_where_workers_run(cluster))
            time.sleep(0.5)
        if follow.poll() is None:
            follow.kill()
        follow.wait()
    logs = log_path.read_text()
    assert cluster.job_status("mn-teacher") == "SUCCEEDED", logs[-4000:]

    assert not second.alive()
    assert {"head": 1, replacement.name: 1} in after, after[-20:]  # the lost rank came back on the new node
    summary = json.loads((run_dir / "teacher" / "summary.json").read_text())
    assert summary["restarts"] >= 1, logs[-3000:]
    assert summary["resumed_from_step"] >= 3  # the restart continued from a checkpoint
    assert summary["steps"] == TOTAL_STEPS  # the same count as an uninterrupted run
    assert summary["world_size"] == 2
    # ZeRO-3 over 2 ranks: each holds about half of the parameters.
    per_rank, total = summary["params_per_rank"], summary["params_total"]
    assert len(per_rank) == 2 and all(abs(n - total / 2) <= 0.01 * total for n in per_rank)
    # The plain torch model built from teacher.safetensors gives the sharded engine's logits.
    assert summary["export_check"]["max_abs_logit_diff"] <= 1e-4
    assert summary["accuracy"] > 0.8
    assert re.search(r"restarted after a worker failure \(attempt \d+\) from the checkpoint at step", logs), logs[-3000:]
    assert (run_dir / "teacher" / "teacher.safetensors").is_file()
    # The latest K stay in the shared storage, plus at most the folder being written when the
    # node died: Ray Train never registered it, so it is not one of the K it manages.
    assert 1 <= len(_checkpoints(run_dir)) <= KEEP + 1
