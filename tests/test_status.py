"""`raydistill status NAME` on run directories written through the real Run API: a finished
run, one still training (its latest checkpoint), one that failed, and a name with no run."""

from __future__ import annotations

import json

import pytest

from raydistill.artifacts import Run, write_json
from raydistill.cli import main

SUMMARIES = {
    "data": {"rows_read": 1797, "rows_skipped": {}, "splits": {"train": 1258, "val": 180, "test": 359}},
    "sweep": {"searcher": "tpe", "scheduler": "asha", "metric": "val_accuracy", "best_metric": 0.9833,
              "trials": [{}, {}, {}, {}], "best_config": {"teacher.lr": 0.00312, "teacher.weight_decay": 1e-4}},
    "teacher": {"arch": "resnet10t", "params_total": 4927186, "zero_stage": 3, "world_size": 2, "accuracy": 0.9861,
                "steps": 100, "samples_per_s": 512.3, "restarts": 1, "resumes": 0},
    "student": {"arch": "test_efficientnet", "params_total": 101370, "accuracy": 0.9777, "retention": 0.9915,
                "params_ratio": 48.6, "latency_ms_p50": {"teacher": 2.11, "student": 0.85}, "int8_accuracy": 0.9805},
    "deploy": {"url": "http://127.0.0.1:8000", "model": "digits", "version": "1a2b3c4d5e6f", "replicas": 1,
               "runtime": "int8"},
}


def _finish(run: Run, stage: str) -> None:
    with run.stage(stage, "hash-" + stage) as outputs:
        outputs.append(write_json(run.dir(stage) / "summary.json", SUMMARIES[stage]))


def _status(tmp_path, name, capsys) -> tuple[int, str, str]:
    code = main(["status", "--storage", str(tmp_path), name])
    out = capsys.readouterr()
    return code, out.out, out.err


def _row(out: str, stage: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(stage + " "))


def test_finished_run_shows_states_times_and_figures(tmp_path, capsys):
    run = Run(tmp_path, "demo")
    run.start({"seed": 0}, "cafe0123456789ab")
    for stage in SUMMARIES:
        _finish(run, stage)
    code, out, _ = _status(tmp_path, "demo", capsys)
    assert code == 0
    assert "config cafe0123456789ab" in out
    for stage in SUMMARIES:
        row = _row(out, stage)
        assert " done " in row and "-" not in row.split()[3:4], row  # a start time
        assert row.split()[4].endswith("s"), row  # how long it took
    assert "1797 rows" in _row(out, "data") and "1258/180/359" in _row(out, "data")
    assert "best val_accuracy 0.9833" in _row(out, "sweep") and "4 trials" in _row(out, "sweep")
    teacher = _row(out, "teacher")
    assert all(s in teacher for s in ("resnet10t 4.93M", "ZeRO-3 x2", "acc 0.9861", "100 steps", "restarts 1"))
    assert "retention 0.992" in _row(out, "student") and "48.6x smaller" in _row(out, "student")
    assert "int8 acc 0.9805" in _row(out, "student")
    assert "http://127.0.0.1:8000" in _row(out, "deploy") and "runtime int8" in _row(out, "deploy")


def test_running_teacher_shows_elapsed_time_and_latest_checkpoint(tmp_path, capsys):
    run = Run(tmp_path, "live")
    run.start({"seed": 0}, "cafe")
    _finish(run, "data")
    stage = run.stage("teacher", "hash-teacher")
    stage.__enter__()  # the stage is running: as seen from another terminal mid-run
    for step in (6, 12):
        ckpt = run.root / "teacher" / "ray" / "teacher-abc" / f"checkpoint_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
    _, out, _ = _status(tmp_path, "live", capsys)
    teacher = _row(out, "teacher")
    assert " running " in teacher and "+" in teacher and "latest checkpoint at step 12" in teacher
    assert " pending " in _row(out, "student") and " done " in _row(out, "data")


def test_failed_stage_shows_its_error(tmp_path, capsys):
    run = Run(tmp_path, "bad")
    run.start({"seed": 0}, "cafe")
    with pytest.raises(RuntimeError):
        with run.stage("teacher", "hash-teacher"):
            raise RuntimeError("teacher training failed: worker died")
    code, out, _ = _status(tmp_path, "bad", capsys)
    assert code == 0 and " failed " in _row(out, "teacher") and "worker died" in _row(out, "teacher")


def test_unknown_run_is_an_error(tmp_path, capsys):
    code, _, err = _status(tmp_path, "nope", capsys)
    assert code == 1 and "no run 'nope'" in err


def test_status_json_holds_each_stage_record_and_summary(tmp_path, capsys):
    run = Run(tmp_path, "demo")
    run.start({"seed": 0}, "cafe0123456789ab")
    for stage in ("data", "sweep", "teacher"):
        _finish(run, stage)
    with pytest.raises(RuntimeError), run.stage("student", "hash-student"):
        raise RuntimeError("worker died")
    assert main(["status", "--json", "--storage", str(tmp_path), "demo"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["config_hash"] == "cafe0123456789ab" and status["root"] == str(run.root)
    stages = status["stages"]
    assert list(stages) == ["data", "sweep", "teacher", "student", "deploy"]
    assert stages["teacher"]["status"] == "done" and stages["teacher"]["summary"] == SUMMARIES["teacher"]
    assert stages["teacher"]["outputs"] == {"teacher/summary.json": run.output_hash("teacher", "teacher/summary.json")}
    assert stages["student"]["status"] == "failed" and "worker died" in stages["student"]["error"]
    assert stages["student"]["summary"] is None
    assert stages["deploy"] == {"status": "pending", "summary": None}


def test_status_json_of_a_missing_run_is_an_error(tmp_path, capsys):
    assert main(["status", "--json", "--storage", str(tmp_path), "nope"]) == 1
    assert "no run 'nope'" in capsys.readouterr().err
