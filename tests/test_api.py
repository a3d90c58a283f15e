"""The Python API as a notebook uses it: a script that starts its own Ray, runs the demo preset
through `raydistill.Pipeline` (every stage for real, on the bundled digits, shortened), deploys,
queries the deployment, shuts it down, and keeps using its Ray afterwards. Then a second
Pipeline with no Ray running starts one and shuts only that one down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import BIN, REPO

QUICK = ["sweep.num_trials=1", "sweep.epochs=1", "teacher.epochs=1", "student.epochs=1",
         "student.prune_finetune_epochs=1"]

NOTEBOOK = textwrap.dedent("""
    import json, sys
    import numpy as np, ray, requests
    import raydistill
    from raydistill.summaries import StudentSummary, TeacherSummary

    storage, port, sets = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    ray.init(address="local", num_cpus=2, include_dashboard=False)          # the notebook's own Ray
    facts = {}

    cfg = raydistill.load_config("configs/demo.yaml", [*sets, f"deploy.port={port}"])
    pipe = raydistill.Pipeline(cfg, storage=storage, name="nb")
    run = pipe.run()
    facts["typed"] = isinstance(run.teacher, TeacherSummary) and isinstance(run.student, StudentSummary)
    facts["stages"] = list(run.summaries)
    facts["teacher"] = run.teacher.model_dump()
    facts["student_accuracy"] = run.student.accuracy
    facts["paths"] = {k: str(v) for k, v in run.paths.items()}
    facts["deploy_before"] = run.deploy is None

    dep = pipe.deploy()
    facts["url"] = dep.url
    digits = np.random.default_rng(0).random((3, 1, 8, 8)).astype("float32")
    body = {"inputs": [{"name": "pixels", "shape": list(digits.shape), "datatype": "FP32",
                        "data": digits.ravel().tolist()}]}
    resp = requests.post(f"{dep.url}/v2/models/{dep.model}/infer", json=body, timeout=30)
    facts["infer"] = [resp.status_code, [o["name"] for o in resp.json().get("outputs", [])]]
    dep.shutdown()
    try:
        facts["after_shutdown"] = requests.get(f"{dep.url}/v2/health/ready", timeout=5).status_code
    except requests.ConnectionError:
        facts["after_shutdown"] = "refused"

    pipe.close()                                   # did not start Ray: must leave it running
    facts["ray_alive_after_close"] = ray.is_initialized()
    facts["ray_task_after"] = ray.get(ray.remote(lambda: 41 + 1).remote())
    facts["reloaded_equal"] = raydistill.Pipeline(cfg, storage=storage, name="nb").load().teacher == run.teacher
    ray.shutdown()

    with raydistill.Pipeline(cfg, storage=storage, name="nb") as own:   # no Ray running: starts one
        dep = own.deploy()
        facts["own_ray_ready"] = requests.get(f"{dep.url}/v2/health/ready", timeout=10).status_code
        facts["own_started_ray"] = own._started_ray
    facts["ray_alive_after_own"] = ray.is_initialized()
    print("FACTS " + json.dumps(facts), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """Runs the notebook; while it trains, reads its manifest over and over and tries a second
    `raydistill run` on the same run name. Returns (run dir, facts, what the watcher saw)."""
    storage = tmp_path_factory.mktemp("runs")
    script = storage / "notebook.py"
    script.write_text(NOTEBOOK)
    manifest = storage / "nb" / "manifest.json"
    with open(storage / "out.txt", "w+") as out, open(storage / "err.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(storage), str(_free_port()), json.dumps(QUICK)],
                                cwd=REPO, stdout=out, stderr=err, text=True)
        seen = {"reads": 0, "second": None}
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if manifest.exists():
                stages = json.loads(manifest.read_text())["stages"]  # valid JSON at every read
                seen["reads"] += 1
                if seen["second"] is None and stages.get("teacher", {}).get("status") == "running":
                    seen["second"] = subprocess.run(
                        [str(BIN / "raydistill"), "run", "--config", "configs/demo.yaml", "--storage", str(storage),
                         "--name", "nb"], cwd=REPO, capture_output=True, text=True, timeout=120)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith("FACTS ")]
    assert proc.returncode == 0 and lines, (stdout[-3000:], stderr[-5000:])
    return storage / "nb", json.loads(lines[-1][len("FACTS "):]), {**seen, "pid": proc.pid}


def test_run_returns_typed_summaries_as_written(notebook):
    root, facts, _ = notebook
    assert facts["typed"] and facts["stages"] == ["data", "sweep", "teacher", "student"]
    written = json.loads((root / "teacher" / "summary.json").read_text())
    assert facts["teacher"] == written  # every key, the typed ones and the extras
    assert facts["student_accuracy"] == json.loads((root / "student" / "summary.json").read_text())["accuracy"]
    assert facts["deploy_before"] and facts["reloaded_equal"]


def test_run_names_its_artifacts(notebook):
    root, facts, _ = notebook
    paths = facts["paths"]
    for key, rel in {"manifest": "manifest.json", "sweep_best": "sweep/best.yaml",
                     "teacher_weights": "teacher/teacher.safetensors", "student_weights": "student/student.safetensors",
                     "student_onnx": "student/student.onnx", "student_report": "student/report.md"}.items():
        assert paths[key] == str(root / rel)
    assert "serve_config" not in paths  # not deployed yet when run() returned


def test_deploy_serves_and_shutdown_removes_only_the_app(notebook):
    _, facts, _ = notebook
    assert facts["url"].startswith("http://127.0.0.1:")
    assert facts["infer"] == [200, ["probabilities", "label"]]
    assert facts["after_shutdown"] in (404, 503, "refused")


def test_a_ray_it_did_not_start_keeps_running(notebook):
    _, facts, _ = notebook
    assert facts["ray_alive_after_close"] and facts["ray_task_after"] == 42


def test_a_ray_it_started_is_shut_down_on_close(notebook):
    _, facts, _ = notebook
    assert facts["own_started_ray"] and facts["own_ray_ready"] == 200
    assert facts["ray_alive_after_own"] is False


def test_a_second_run_on_the_same_name_is_refused_while_the_first_runs(notebook):
    """The first (the notebook's) finished; the second exited 1 naming it; every read of the
    manifest while both ran was valid JSON."""
    _, facts, seen = notebook
    assert facts["own_ray_ready"] == 200  # the first ran to its end
    second = seen["second"]
    assert second is not None, "the teacher stage was never seen running"
    assert second.returncode == 1 and f"run 'nb' is in use by pid {seen['pid']}" in second.stderr, second.stderr
    assert seen["reads"] > 20


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    import raydistill

    pipe = raydistill.Pipeline(REPO / "configs" / "demo.yaml", storage=tmp_path)
    assert pipe.name == "demo"
    with pytest.raises(ValueError, match="unknown stages \\['train'\\]"):
        pipe.run(stages=("train",))
    assert not (tmp_path / "demo").exists()
