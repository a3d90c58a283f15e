"""End to end, the way users run it on a cluster: a real Ray head (`ray start --head`, token
authentication on), the pipeline submitted with `ray job submit`, the deployment queried over
HTTP, then bad input against the same run. The test stops only the head it started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests

from raydistill.artifacts import sha256
from raydistill.localcluster import LocalCluster

from conftest import BIN, REPO, png_bytes

pytestmark = pytest.mark.e2e

# Small but complete: every stage runs for real (ZeRO-3 on 2 workers, Tune with ASHA, KD).
QUICK = ["sweep.num_trials=2", "sweep.epochs=1", "teacher.epochs=2", "student.epochs=2", "student.prune_finetune_epochs=1"]


@pytest.fixture(scope="module")
def head():
    """A real Ray head of 2 CPUs, token auth on (raydistill.localcluster)."""
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))  # short: Ray's socket paths are bounded
    cluster = LocalCluster(root, head_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """The pipeline, submitted as a job; returns (run dir, serve URL, job output)."""
    storage = tmp_path_factory.mktemp("runs")
    sets = [*QUICK, f"deploy.port={head.serve_port}"]
    out = head.submit("e2e-pipeline", [
        "python", "jobs/pipeline.py", "--config", "configs/demo.yaml", "--storage", str(storage),
        "--name", "e2e", *[a for s in sets for a in ("--set", s)],
    ], cwd=REPO, wait=True)
    return storage / "e2e", f"http://127.0.0.1:{head.serve_port}", out.stdout


def test_job_without_token_is_refused(head):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(head.root)  # no ~/.ray/auth_token to fall back on
    # Refused for want of the token (not for any other reason, such as an unreachable head).
    out = head.ray("job", "list", env=env, check=False, timeout=120)
    assert out.returncode != 0 and "Missing authentication token" in out.stdout + out.stderr
    # A submission without the token never becomes a job (nothing runs on the cluster).
    out = head.ray("job", "submit", "--submission-id", "no-token", "--no-wait", "--", "echo", "pwned",
                   env=env, check=False, timeout=120)
    assert out.returncode != 0 and "Missing authentication token" in out.stdout + out.stderr
    assert "no-token" not in head.ray("job", "list", timeout=120).stdout


def test_pipeline_job_writes_every_stage(submitted):
    run, _, _ = submitted
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s: r["status"] for s, r in manifest["stages"].items()} == dict.fromkeys(
        ["data", "sweep", "teacher", "student", "deploy"], "done")
    for stage, record in manifest["stages"].items():
        for rel, digest in record["outputs"].items():
            assert sha256(run / rel) == digest, rel

    data = json.loads((run / "data" / "summary.json").read_text())
    assert data["rows_read"] == 1797 and data["rows_skipped"] == {}

    sweep = json.loads((run / "sweep" / "summary.json").read_text())
    assert sweep["searcher"] == "tpe" and sweep["scheduler"] == "asha" and len(sweep["trials"]) == 2
    assert (run / "sweep" / "best.yaml").exists()

    teacher = json.loads((run / "teacher" / "summary.json").read_text())
    assert teacher["world_size"] == 2 and teacher["zero_stage"] == 3
    # ZeRO-3: each rank holds its own half of the parameters (padding aside).
    assert len(teacher["params_per_rank"]) == 2
    for held in teacher["params_per_rank"]:
        assert abs(held - teacher["params_total"] / 2) <= 0.01 * teacher["params_total"]
    assert teacher["accuracy"] > 0.8

    student = json.loads((run / "student" / "summary.json").read_text())
    assert student["params_ratio"] > 10
    assert student["accuracy"] > 0.5  # 2 epochs only; the demo's figures are in README
    assert student["retention"] == pytest.approx(student["accuracy"] / student["teacher_accuracy"])
    assert set(student["latency_ms_p50"]) == {"teacher", "student"}
    assert student["kd"]["T"] == 4.0


def test_deployment_answers_over_http(submitted, digits_parquet):
    _, url, _ = submitted
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
    from raydistill.config import load_config
    from raydistill.data import load_dataset

    test = load_dataset(load_config(None), str(digits_parquet)).test
    x = (test.images[:64] / 255.0).astype(np.float32)
    body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    resp = requests.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    labels = next(o for o in resp.json()["outputs"] if o["name"] == "label")["data"]
    assert np.mean(np.asarray(labels) == test.labels[:64]) > 0.5

    resp = requests.post(f"{url}/predict", files=[("file", ("d.png", png_bytes(test.images[0][0])))], timeout=30)
    assert resp.status_code == 200 and "label" in resp.json()["predictions"][0]

    bad = requests.post(f"{url}/v2/models/digits/infer", json={"inputs": [{"name": "pixels"}]}, timeout=30)
    assert 400 <= bad.status_code < 500 and "error" in bad.json()


def _cli(head, *args, timeout=600):
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}  # as a user pointed at the cluster
    return subprocess.run([str(BIN / "raydistill"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _hashes(run: Path) -> dict:
    return {str(p.relative_to(run)): sha256(p) for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix in (".json", ".safetensors", ".yaml") and "ray" not in p.parts}


def test_bad_input_fails_clearly_and_keeps_earlier_outputs(head, submitted):
    run, _, _ = submitted
    storage = str(run.parent)
    kept = {k: v for k, v in _hashes(run).items() if k != "manifest.json"}

    # A malformed config: exit 2, one line naming the key.
    out = _cli(head, "run", "--config", "configs/demo.yaml", "--set", "student.alpha=2", "--storage", storage,
               "--name", "e2e")
    assert out.returncode == 2 and "student.alpha" in out.stderr

    # A missing data file.
    out = _cli(head, "train", "--config", "configs/demo.yaml", "--set", "data.source=/nonexistent/x.parquet",
               "--storage", storage, "--name", "e2e")
    assert out.returncode == 1 and "/nonexistent/x.parquet" in out.stderr and "no such file" in out.stderr

    # Wrong column names.
    out = _cli(head, "train", "--config", "configs/demo.yaml", "--set", "data.label_column=target",
               "--storage", storage, "--name", "e2e")
    assert out.returncode == 1 and "no column 'target'" in out.stderr

    # A corrupted teacher checkpoint: distillation refuses it by hash, before any work.
    teacher = run / "teacher" / "teacher.safetensors"
    original = teacher.read_bytes()
    teacher.write_bytes(original[: len(original) // 2])
    try:
        out = _cli(head, "distill", "--config", "configs/demo.yaml", *sum((["--set", s] for s in QUICK), []),
                   "--storage", storage, "--name", "e2e")
        assert out.returncode == 1 and "teacher.safetensors" in out.stderr and "sha256" in out.stderr
    finally:
        teacher.write_bytes(original)

    assert {k: v for k, v in _hashes(run).items() if k != "manifest.json"} == kept
