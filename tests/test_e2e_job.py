"""End to end, the way users run it on a cluster: a real Ray head (`ray start --head`, token
authentication on), the pipeline submitted with `ray job submit`, stopped with `ray job stop`
while the teacher trains, submitted again (it resumes from the teacher's checkpoint), the
deployment queried over HTTP, then bad input against the same run. The test stops only the
head it started.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from raydistill.artifacts import Run, sha256
from raydistill.config import load_config
from raydistill.testing.localcluster import LocalCluster
from raydistill.models import ModelSpec, load_network
from raydistill.training import StepPlan

from conftest import BIN, REPO, png_bytes
from ray_internals import registered_checkpoint

pytestmark = pytest.mark.e2e

# Small but complete: every stage runs for real (ZeRO-3 on 2 workers, Tune with ASHA, KD,
# pruning kept whatever it costs so that its path runs too). The teacher trains 2 epochs of
# 9 steps on the digits' 1,258 training rows, with a checkpoint every 3 steps.
KEEP = 2
QUICK = ["sweep.num_trials=2", "sweep.epochs=1", "teacher.epochs=2", "teacher.checkpoint_every_steps=3",
         f"teacher.keep_checkpoints={KEEP}", "student.epochs=2", "student.prune_finetune_epochs=1",
         "student.prune_max_drop=1.0"]
TEACHER_STEPS = StepPlan.of(1258, 2, 64, 2).total_steps


def _checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("teacher/ray/teacher-*/checkpoint_*") if p.is_dir())


def _hashes(run: Path) -> dict:
    return {str(p.relative_to(run)): sha256(p) for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix in (".json", ".safetensors", ".yaml") and "ray" not in p.parts}


@pytest.fixture(scope="module")
def head():
    """A real Ray head of 2 CPUs, token auth on (raydistill.testing.localcluster). A runtime
    env that cannot be built fails on its first attempt, not after Ray's three (minutes each)."""
    with LocalCluster.temporary(head_cpus=2, extra_env={"RUNTIME_ENV_RETRY_TIMES": "1"}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """The pipeline submitted as a job, stopped with `ray job stop` once the teacher has
    registered a checkpoint, then submitted again under the same run name.
    Returns (run dir, serve URL, second job's output, what the stop left)."""
    storage = tmp_path_factory.mktemp("runs")
    run = storage / "e2e"
    sets = [*QUICK, f"deploy.port={head.serve_port}"]
    job = ["python", "jobs/pipeline.py", "--config", "configs/demo.yaml", "--storage", str(storage),
           "--name", "e2e", *[a for s in sets for a in ("--set", s)]]

    head.submit("e2e-stopped", job, cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (len(_checkpoints(run)) >= 2 and registered_checkpoint(run)):
        time.sleep(0.5)
    status = head.job_status("e2e-stopped")
    assert status == "RUNNING" and registered_checkpoint(run), head.ray("job", "logs", "e2e-stopped").stdout[-3000:]
    head.ray("job", "stop", "e2e-stopped", timeout=120)  # waits until the job has stopped
    stopped = {"status": head.job_status("e2e-stopped"), "manifest": json.loads((run / "manifest.json").read_text()),
               "hashes": _hashes(run), "logs": head.ray("job", "logs", "e2e-stopped").stdout}

    # Submitted again; while it runs, the manifest is read over and over (it must parse every
    # time) and a second `raydistill run` on the same name is tried once (it must be refused).
    head.submit("e2e-pipeline", job, cwd=REPO)
    race = {"reads": 0, "second": None}
    deadline = time.monotonic() + 900
    while head.job_status("e2e-pipeline") in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        if (run / "manifest.json").exists():
            stages = json.loads((run / "manifest.json").read_text())["stages"]
            race["reads"] += 1
            if race["second"] is None and "running" in (stages.get(s, {}).get("status") for s in ("teacher", "student")):
                race["second"] = _cli(head, "run", "--config", "configs/demo.yaml", "--storage", str(storage),
                                      "--name", "e2e", timeout=120)
        time.sleep(0.5)
    status, logs = head.job_status("e2e-pipeline"), head.ray("job", "logs", "e2e-pipeline").stdout
    assert status == "SUCCEEDED", logs[-3000:]
    return run, f"http://127.0.0.1:{head.serve_port}", logs, stopped, race


def test_a_second_run_on_the_same_name_is_refused_while_the_job_runs(submitted):
    *_, race = submitted
    second = race["second"]
    assert second is not None, "no stage was seen running"
    assert second.returncode == 1 and "run 'e2e' is in use by pid" in second.stderr, second.stderr[-2000:]
    assert race["reads"] > 5  # and every one of them parsed


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
    run, *_ = submitted
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
    for key in ("arch", "params_total", "accuracy", "teacher_accuracy", "retention", "params_ratio",
                "latency_ms_p50", "kd"):  # as DESIGN fixes them
        assert key in student
    assert student["params_ratio"] > 10
    assert student["accuracy"] > 0.5  # 2 epochs only; the demo's figures are in README
    assert student["retention"] == pytest.approx(student["accuracy"] / student["teacher_accuracy"])
    assert set(student["latency_ms_p50"]) == {"teacher", "student"}
    assert set(student["latency_ms_p50_exported"]) == {"student_onnx", "student_int8"}
    assert student["kd"] == {**student["kd"], "mode": "online", "T": 4.0}
    assert student["pruning"]["status"] == "kept"
    assert student["pruning"]["params_after"] < student["pruning"]["params_before"]
    tolerance = load_config(REPO / "configs" / "demo.yaml", QUICK).student.onnx_tolerance
    assert student["onnx"]["max_abs_logit_diff"] <= tolerance and student["int8_accuracy"] is not None
    assert "| teacher |" in (run / "student" / "report.md").read_text()
    assert not list((run / "student").glob("*.measure"))

    # deploy.runtime=auto: int8 if it held its validation accuracy, else the fp32 ONNX.
    held = student["int8_val_accuracy"] >= student["val_accuracy"] - load_config(REPO / "configs" / "demo.yaml").deploy.int8_max_drop
    expected = ("int8", "student.int8.onnx") if held else ("onnx", "student.onnx")
    deploy = json.loads((run / "deploy" / "summary.json").read_text())
    assert (deploy["runtime"], deploy["onnx"]) == (expected[0], str(run / "student" / expected[1]))
    assert deploy["runtime_reason"].startswith("auto: int8 val accuracy")


def test_stored_student_is_the_pruned_one_and_rebuilds_from_its_file(submitted):
    from raydistill import compress
    from raydistill.artifacts import load_weights

    run, *_ = submitted
    cfg = load_config(REPO / "configs" / "demo.yaml", QUICK)
    outputs = json.loads((run / "manifest.json").read_text())["stages"]["student"]["outputs"]
    for name in ("student.safetensors", "student.onnx", "student.int8.onnx", "report.md", "report.png", "summary.json"):
        assert outputs[f"student/{name}"] == sha256(run / "student" / name)
    state, meta = load_weights(run / "student" / "student.safetensors", outputs["student/student.safetensors"])
    net = load_network(state, meta)
    summary = json.loads((run / "student" / "summary.json").read_text())
    assert sum(p.numel() for p in net.parameters()) == summary["params_total"]
    spec = ModelSpec.from_meta(meta)
    images = np.random.default_rng(0).integers(0, 256, (16, *spec.input_shape), dtype=np.uint8)
    compress.check_onnx(net, spec, run / "student" / "student.onnx", images, cfg.student.onnx_tolerance)
    # Unchanged: a rerun skips the stage; a changed output file makes it run again.
    record = Run(run.parent, run.name)
    digest = json.loads((run / "manifest.json").read_text())["stages"]["student"]["config_hash"]
    assert record.is_done("student", digest)
    onnx = run / "student" / "student.onnx"
    original = onnx.read_bytes()
    try:
        onnx.write_bytes(b"changed")
        assert not record.is_done("student", digest)
    finally:
        onnx.write_bytes(original)


def test_stopped_job_left_its_outputs_and_the_resubmitted_one_resumed_the_teacher(submitted):
    run, _, out, stopped, _ = submitted
    # `ray job stop` sent SIGTERM: the driver recorded the teacher as interrupted, and earlier
    # stages' outputs stayed as they were (the second job reused them: they are unchanged).
    assert stopped["status"] == "STOPPED"
    stages = stopped["manifest"]["stages"]
    assert stages["teacher"]["status"] == "interrupted", stopped["logs"][-3000:]
    assert {stages[s]["status"] for s in ("data", "sweep")} == {"done"}
    assert "teacher/teacher.safetensors" not in stopped["hashes"]
    now = _hashes(run)
    assert all(now[path] == digest for path, digest in stopped["hashes"].items()
               if path.startswith(("data/", "sweep/")))

    teacher = json.loads((run / "teacher" / "summary.json").read_text())
    assert teacher["resumes"] >= 1 and teacher["resumed_from_step"] >= 3, out[-3000:]
    assert teacher["restarts"] == 0  # a rerun is a resume, not a restart after a worker failure
    assert teacher["steps"] == TEACHER_STEPS  # the same count as an uninterrupted run
    assert "resumed from the checkpoint at step" in out
    # The plain torch model built from teacher.safetensors gives the sharded engine's logits.
    assert teacher["export_check"]["max_abs_logit_diff"] <= 1e-4
    # Rank 0 measured how long it waited for augmented batches (a share of its step time).
    assert 0.0 <= teacher["data_wait_fraction"] < 1.0 and teacher["data_first_batch_s"] > 0
    # Old checkpoints are deleted: the rerun keeps its latest K. Folders Ray Train never
    # registered stay (it manages only the K it knows): the one the stopped run was writing,
    # and the one it may have written in the moment before its controller stopped.
    assert len(_checkpoints(run)) <= KEEP + 2
    assert list((run / "teacher" / "tensorboard").glob("events.out.tfevents.*"))


def test_deployment_answers_over_http(submitted):
    run, url, *_ = submitted
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
    assert requests.get(f"{url}/v2/models/digits", timeout=30).json()["platform"] == "onnxruntime_onnx"  # int8 or fp32 ONNX
    from raydistill.data import Dataset

    test = Dataset.load(run / "data" / "splits").test.head(64)  # the run's own held-out split
    x = (test.images / 255.0).astype(np.float32)
    body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    resp = requests.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    labels = next(o for o in resp.json()["outputs"] if o["name"] == "label")["data"]
    assert np.mean(np.asarray(labels) == test.labels) > 0.5

    resp = requests.post(f"{url}/predict", files=[("file", ("d.png", png_bytes(test.images[0][0])))], timeout=30)
    assert resp.status_code == 200 and "label" in resp.json()["predictions"][0]

    bad = requests.post(f"{url}/v2/models/digits/infer", json={"inputs": [{"name": "pixels"}]}, timeout=30)
    assert 400 <= bad.status_code < 500 and "error" in bad.json()


def _cli(head, *args, timeout=600):
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}  # as a user pointed at the cluster
    return subprocess.run([str(BIN / "raydistill"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_bad_input_fails_clearly_and_keeps_earlier_outputs(head, submitted):
    run, *_ = submitted
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


# ---- shipped code: what is submitted is what runs ----------------------------------------

PROBE = ("import ray, raydistill; ray.init(); "
         "print('driver', getattr(raydistill, 'SUBMITTED', None)); "
         "print('task', ray.get(ray.remote(num_cpus=0)(lambda: getattr(__import__('raydistill'), 'SUBMITTED', None))"
         ".remote()))")


def test_a_submitted_edited_copy_runs_its_edits_in_the_driver_and_in_tasks(head, tmp_path):
    """The head's Python has raydistill installed (this checkout, editable); the job is a copy
    of the repository with an edit. runtime_env.yaml ships the copy's package (py_modules), so
    the edit is what the driver and a remote task import."""
    import shutil
    import uuid

    copy = tmp_path / "edited"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if name.startswith(("lib/", "runtime_env.yaml", "jobs/")):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, copy / name)
    mark = uuid.uuid4().hex
    with open(copy / "lib" / "raydistill" / "__init__.py", "a") as f:
        f.write(f"\nSUBMITTED = {mark!r}\n")
    out = head.submit("edited-copy", ["python", "-c", PROBE], cwd=copy, wait=True).stdout
    assert f"driver {mark}" in out and f"task {mark}" in out, out[-2000:]


def _serve(head, *args, cwd):
    return subprocess.run([str(BIN / "serve"), *args, "--address", head.address], env=head.env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _app_status(head, name: str, cwd, want: set[str], timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = yaml.safe_load(_serve(head, "status", cwd=cwd).stdout or "{}") or {}
        app = (status.get("applications") or {}).get(name, {})
        if app.get("status") in want or time.monotonic() > deadline:
            return app
        time.sleep(2)


def test_serve_deploy_of_the_generated_config_serves_from_another_directory(head, submitted, tmp_path):
    """`serve deploy` of the config the job wrote, from a folder that is not the repository:
    the builder comes from the package, the code from the job's shipped py_modules. A second
    app whose weights changed since is refused by name, and the first keeps serving."""
    run, *_ = submitted
    config = yaml.safe_load((run / "deploy" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "raydistill.serving:app"
    assert any(m.startswith("gcs://") for m in app["runtime_env"]["py_modules"])
    again = {**app, "name": "again", "route_prefix": "/again"}
    changed = {**app, "name": "changed", "route_prefix": "/changed", "args": {**app["args"], "sha256": "0" * 64}}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "serve_config.yaml").write_text(yaml.safe_dump({**config, "applications": [again, changed]}))
    out = _serve(head, "deploy", "serve_config.yaml", cwd=elsewhere)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _app_status(head, "again", elsewhere, {"RUNNING"})["status"] == "RUNNING"
    ready = requests.get(f"http://127.0.0.1:{head.serve_port}/again/v2/health/ready", timeout=30)
    assert ready.status_code == 200
    failed = _app_status(head, "changed", elsewhere, {"DEPLOY_FAILED"})
    assert failed.get("status") == "DEPLOY_FAILED", failed
    assert "student.safetensors: sha256 differs" in failed.get("message", ""), failed.get("message", "")[-1000:]
    assert _app_status(head, "again", elsewhere, {"RUNNING"})["status"] == "RUNNING"


def test_a_runtime_env_that_cannot_be_built_fails_the_job_clearly(head, tmp_path):
    """A package to ship that is not there: refused when submitted, naming it; and a pip
    requirement that cannot be installed: the job fails, its status says the runtime env."""
    missing = tmp_path / "nowhere" / "raydistill"
    out = head.ray("job", "submit", "--runtime-env-json", json.dumps({"py_modules": [str(missing)]}),
                   "--", "python", "-c", "print(1)", check=False, cwd=tmp_path)
    assert out.returncode != 0 and str(missing) in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]
    env = {"pip": {"packages": ["raydistill-no-such-package==0.0.0"], "pip_install_options": ["--no-index"]}}
    head.ray("job", "submit", "--no-wait", "--submission-id", "bad-env", "--runtime-env-json", json.dumps(env),
             "--", "python", "-c", "print(1)", cwd=tmp_path)
    deadline = time.monotonic() + 300
    while head.job_status("bad-env") in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(2)
    assert head.job_status("bad-env") == "FAILED"
    details = head.ray("job", "status", "bad-env", "--verbose", check=False).stdout
    assert "runtime env" in details.lower() or "runtime_env" in details.lower(), details[-2000:]
