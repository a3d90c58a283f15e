"""The sweep on a real local Ray: a search space from YAML, Optuna + ASHA over in-process trials,
trials that are Ray Train runs, a driver killed and resumed, MLflow logging, and bad input
refused before any trial starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raydistill import pipeline
from raydistill.config import ConfigError, dump_yaml, load_config

from conftest import REPO
from ray_internals import terminated_tune_trials

DEMO = REPO / "configs" / "demo.yaml"
SMALL = "test_efficientnet"  # timm, 0.1M parameters: trials in seconds, not minutes


# ---- bad input: refused at load, before Ray starts ----------------------------------------


def _space(tmp_path: Path, space: dict, **sweep) -> Path:
    tree = yaml.safe_load(DEMO.read_text())
    tree["sweep"].update(sweep, space=space)
    tree["teacher"]["arch"] = SMALL
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    "space, sweep, expected",
    [
        ({"teacher.lr": {"loguniform": [1e-2, 1e-3]}}, {}, "sweep.space.teacher.lr': loguniform: the range [0.01, 0.001] is inverted"),
        ({"teacher.weight_decay": {"uniform": [0.1, 0.1]}}, {}, "sweep.space.teacher.weight_decay': uniform: the range [0.1, 0.1] is empty"),
        ({"teacher.batch_size": {"choice": []}}, {}, "sweep.space.teacher.batch_size': choice: the list of values is empty"),
        ({"teacher.lr": {"loguniform": [0, 1e-2]}}, {}, "loguniform: bounds must be positive"),
        ({"teacher.lr": {"normal": [0, 1]}}, {}, "sweep.space.teacher.lr"),
        ({"teacher.lrate": {"loguniform": [1e-3, 1e-2]}}, {}, "sweep.space.teacher.lrate: not a config key"),
        ({"teacher": {"uniform": [0, 1]}}, {}, "sweep.space.teacher: 'teacher' is a section"),
        ({"data.augment.affine.translate": {"uniform": [0.1, 0.7]}}, {}, "sweep.space.data.augment.affine.translate: uniform [0.1, 0.7] allows a value"),
        ({"teacher.batch_size": {"uniform": [16, 64]}}, {}, "sweep.space.teacher.batch_size: uniform [16.0, 64.0] allows a value"),
        ({"teacher.zero_stage": {"choice": [1, 4]}}, {}, "sweep.space.teacher.zero_stage: choice [1, 4] allows a value"),
        ({"teacher.lr": {"loguniform": [1e-3, 1e-2]}}, {"metric": "val_f1"}, "sweep.metric 'val_f1' is never reported by the trials; they report: val_accuracy, loss"),
        ({}, {}, "sweep.space is empty"),
    ],
)
def test_bad_space_or_metric_names_the_key(tmp_path, space, sweep, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_space(tmp_path, space, **sweep))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "space, sweep, key",
    [
        ({"teacher.lr": {"uniform": [0.01, 0.001]}}, {}, "sweep.space.teacher.lr"),
        ({"teacher.no_such_key": {"uniform": [0.0, 1.0]}}, {}, "teacher.no_such_key"),
        ({"teacher.lr": {"loguniform": [1e-3, 1e-2]}}, {"metric": "f1"}, "sweep.metric"),
        # Keys a trial sets itself: in-process trials run sweep.epochs and one process...
        ({"teacher.epochs": {"int": [1, 3]}}, {}, "teacher.epochs: in-process trials"),
        # ...and Ray Train trials set their own workers and epochs too. (An in-process trial
        # keeps the teacher's global batch by accumulating over teacher.num_workers
        # micro-batches, so there that key does change what it trains.)
        ({"teacher.epochs": {"int": [1, 3]}}, {"trial_workers": 2}, "teacher.epochs: Ray Train trials"),
        ({"teacher.num_workers": {"choice": [1, 2]}}, {"trial_workers": 2}, "teacher.num_workers: Ray Train trials"),
        # A key the trial's recipe never reads (more in the test below).
        ({"deploy.replica_cpus": {"uniform": [0.5, 1]}}, {}, "deploy.replica_cpus: the recipe a sweep trial trains does not read"),
    ],
)
def test_cli_exits_2_for_a_bad_sweep_before_anything_runs(tmp_path, space, sweep, key):
    out = subprocess.run(
        [sys.executable, "jobs/sweep.py", "--config", str(_space(tmp_path, space, **sweep)),
         "--storage", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0]
    assert not (tmp_path / "runs").exists()


def test_space_round_trips_through_yaml(tmp_path):
    space = {
        "teacher.lr": {"loguniform": [3e-4, 1e-2]},
        "teacher.batch_size": {"choice": [32, 64]},
        "teacher.warmup_fraction": {"uniform": [0.0, 0.3]},
        "data.augment.affine.degrees": {"int": [0, 30]},
    }
    cfg = load_config(_space(tmp_path, space))
    assert {k: d.kind for k, d in cfg.sweep.space.items()} == {
        "teacher.lr": "loguniform", "teacher.batch_size": "choice",
        "teacher.warmup_fraction": "uniform", "data.augment.affine.degrees": "int"}
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again).sweep.space == cfg.sweep.space
    assert yaml.safe_load(again.read_text())["sweep"]["space"]["data.augment.affine.degrees"] == {"int": [0, 30]}


def test_presets_load_with_their_spaces():
    from raydistill.sweep import check_swept_keys

    for name in ("demo", "default", "gpu-single", "gpu-cluster"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert "teacher.lr" in cfg.sweep.space
        check_swept_keys(cfg)  # every preset key changes what its trials train


@pytest.mark.parametrize(
    "space, sweep, expected",
    [
        # Keys the trial's recipe never reads: another stage's, the data stage's split (made
        # once, before the sweep), and settings that change only speed.
        ({"student.lr": {"loguniform": [1e-3, 1e-2]}}, {}, "student.lr: the recipe a sweep trial trains does not read"),
        ({"data.val_fraction": {"uniform": [0.1, 0.2]}}, {}, "data.val_fraction: the recipe"),
        ({"data.cpus_per_task": {"choice": [0.5, 1.0]}}, {"trial_workers": 2}, "data.cpus_per_task: the recipe"),
        ({"teacher.checkpoint_every_steps": {"int": [10, 100]}}, {}, "teacher.checkpoint_every_steps: the recipe"),
        # A value that leaves the trial, at its sweep.epochs, nothing to train.
        ({"teacher.freeze_backbone_epochs": {"int": [0, 2]}}, {"epochs": 2},
         "sweep.space.teacher.freeze_backbone_epochs=2 in in-process trials (sweep.trial_workers: 0): bad values"),
    ],
)
def test_a_key_that_changes_nothing_a_trial_trains_is_refused(tmp_path, space, sweep, expected):
    from raydistill.sweep import check_swept_keys

    with pytest.raises(ConfigError) as err:
        check_swept_keys(load_config(_space(tmp_path, space, **sweep)))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("trial_workers", [0, 2])
@pytest.mark.parametrize("key, dist", [
    ("teacher.batch_size", {"choice": [32, 64]}),
    ("teacher.grad_clip", {"uniform": [0.5, 2.0]}),
    ("teacher.warmup_fraction", {"uniform": [0.0, 0.3]}),
    ("teacher.lr_schedule", {"choice": ["cosine", "linear"]}),
    ("teacher.layer_decay", {"uniform": [0.5, 1.0]}),
    ("teacher.freeze_backbone_epochs", {"int": [0, 1]}),
    ("teacher.arch", {"choice": [SMALL, "resnet10t"]}),
    ("data.image_size", {"choice": [16, 24]}),
    ("data.augment.affine.degrees", {"int": [0, 30]}),
    ("seed", {"int": [0, 3]}),
])
def test_keys_that_change_the_trial_recipe_are_accepted(tmp_path, key, dist, trial_workers):
    from raydistill.sweep import check_swept_keys

    check_swept_keys(load_config(_space(tmp_path, {key: dist}, trial_workers=trial_workers)))


@pytest.mark.parametrize("searcher", ["tpe", "gp", "random"])
@pytest.mark.parametrize("scheduler", ["asha", "hyperband", "fifo"])
def test_every_searcher_and_scheduler_is_built_from_the_config(searcher, scheduler):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    from raydistill.sweep import _scheduler, _searcher

    cfg = load_config(DEMO, [f"sweep.searcher={searcher}", f"sweep.scheduler={scheduler}", "sweep.metric=loss"])
    search = _searcher(cfg.sweep, cfg.seed)
    assert (search.metric, search.mode) == ("loss", "min")
    assert type(search._sampler).__name__ == {"tpe": "TPESampler", "gp": "GPSampler", "random": "RandomSampler"}[searcher]
    if searcher == "tpe":  # a joint density over the space; running trials held as bad results
        assert search._sampler._multivariate and search._sampler._constant_liar
    expected = {"asha": ASHAScheduler, "hyperband": HyperBandScheduler, "fifo": FIFOScheduler}[scheduler]
    assert isinstance(_scheduler(cfg.sweep), expected)


def test_startup_trials_are_a_share_of_the_budget():
    counts = {n: load_config(DEMO, [f"sweep.num_trials={n}"]).sweep.resolved_startup_trials for n in (4, 24, 60, 200)}
    assert counts == {4: 2, 24: 4, 60: 10, 200: 10}
    assert load_config(DEMO, ["sweep.startup_trials=7"]).sweep.resolved_startup_trials == 7
    assert load_config(DEMO, ["sweep.metric=val_loss"]).sweep.resolved_mode == "min"


def test_concurrency_follows_the_cluster_cpus():
    from raydistill.sweep import max_concurrent

    in_process = load_config(DEMO)  # 1 CPU per trial
    assert [max_concurrent(in_process, cpus) for cpus in (1, 2, 16)] == [1, 2, 16]
    # Ray Train trials: 2 workers x 0.75 CPU + one 0.25-CPU augmentation task = 1.75 CPUs each.
    on_train = load_config(DEMO, ["sweep.trial_workers=2"])
    assert [max_concurrent(on_train, cpus) for cpus in (2, 3.5, 16)] == [1, 2, 9]
    assert max_concurrent(load_config(DEMO, ["sweep.max_concurrent_trials=3"]), 16) == 3
    # GPU trials: 16 CPUs and 8 GPUs hold two 4-worker trials.
    on_gpus = load_config(DEMO, ["sweep.trial_workers=4", "teacher.use_gpu=true", "teacher.cpus_per_worker=1"])
    assert max_concurrent(on_gpus, 16, 8) == 2


def test_progress_curve_orders_reports_by_arrival_and_keeps_the_best_so_far():
    from raydistill.sweep import progress_curve

    a = [{"epoch": 1, "metric": 0.5, "at": 1.0}, {"epoch": 2, "metric": 0.7, "at": 4.0}]
    b = [{"epoch": 1, "metric": 0.6, "at": 2.0}, {"epoch": 2, "metric": 0.55, "at": 3.0}]
    assert progress_curve([a, b], "max") == [[1, 0.5], [2, 0.6], [3, 0.6], [4, 0.7]]
    assert progress_curve([a, b], "min") == [[1, 0.5], [2, 0.5], [3, 0.5], [4, 0.5]]


def test_trial_epoch_budget_counts_every_trials_epochs_and_survives_a_restore(tmp_path):
    import pickle

    from raydistill.sweep import TrialEpochBudget

    ledger = tmp_path / "trial_epochs.json"
    stop = TrialEpochBudget(5, ledger)
    for trial, epoch in [("a", 1), ("b", 1), ("a", 2)]:
        assert stop(trial, {"epoch": epoch, "val_loss": 1.0}) is False
    assert (stop.spent(), stop.stop_all()) == (3, False)
    # What Tune pickled when the sweep started, restored by --resume: it counts on from the ledger.
    restored = pickle.loads(pickle.dumps(TrialEpochBudget(5, ledger)))
    restored("b", {"epoch": 2})
    assert (restored.spent(), restored.stop_all()) == (4, False)
    restored("c", {"epoch": 1})
    assert restored.stop_all()
    assert load_config(DEMO, ["sweep.trial_epoch_budget=96"]).sweep.trial_epoch_budget == 96
    with pytest.raises(ConfigError, match="sweep.trial_epoch_budget"):
        load_config(DEMO, ["sweep.trial_epoch_budget=0"])


# ---- real sweeps -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


def test_sweep_with_a_yaml_space_writes_summary_best_yaml_plot_and_mlflow(tmp_path, local_ray):
    space = {
        "teacher.lr": {"loguniform": [3e-4, 1e-2]},
        "teacher.batch_size": {"choice": [32, 64]},
        "data.augment.affine.degrees": {"int": [0, 20]},
        "data.augment.gaussian_noise.std": {"uniform": [0.0, 0.1]},
    }
    cfg = load_config(_space(tmp_path, space, num_trials=4, epochs=2, scheduler="asha", searcher="tpe"))
    pipeline.run_stages(cfg, str(tmp_path), "s", ("sweep",))
    out = tmp_path / "s" / "sweep"
    summary = json.loads((out / "summary.json").read_text())

    assert (summary["searcher"], summary["scheduler"], summary["metric"]) == ("tpe", "asha", "val_accuracy")
    assert len(summary["trials"]) == 4
    for trial in summary["trials"]:
        assert set(trial["config"]) == set(space)
        assert trial["status"] in ("completed", "stopped_early")
        assert 1 <= trial["epochs"] <= 2 and len(trial["history"]) == trial["epochs"]
        assert trial["config"]["teacher.batch_size"] in (32, 64)
        assert isinstance(trial["config"]["data.augment.affine.degrees"], int)
        assert 0.0 <= trial["metric"] <= 1.0
    assert summary["best_metric"] == max(t["metric"] for t in summary["trials"] if t["epochs"] == 2)
    assert summary["trial_epochs"] == sum(t["epochs"] for t in summary["trials"])
    assert summary["curve"][-1][0] == summary["trial_epochs"]
    assert summary["curve"][-1][1] >= summary["best_metric"]

    # best.yaml is a whole config the teacher stage accepts as is, with the best values in it.
    best = load_config(out / "best.yaml")
    for key, value in summary["best_config"].items():
        assert best.value_of(key) == pytest.approx(value)
    from raydistill.data import Dataset
    from raydistill.training import check_teacher, teacher_spec

    data = Dataset.load(tmp_path / "s" / "data" / "splits")
    check_teacher(best, teacher_spec(best, data), len(data.train))

    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One MLflow run per trial in the run's local file store, with the per-epoch metric.
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("raydistill-s")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    assert all({"val_accuracy", "val_loss", "loss"} <= set(r.data.metrics) and "teacher.lr" in r.data.params for r in runs)


def test_trial_epoch_budget_ends_the_sweep_when_the_trials_have_spent_it(tmp_path, local_ray):
    space = {"teacher.lr": {"loguniform": [3e-4, 1e-2]}}
    cfg = load_config(_space(tmp_path, space, num_trials=8, epochs=2, scheduler="fifo", searcher="random",
                             trial_epoch_budget=5, mlflow=False))
    pipeline.run_stages(cfg, str(tmp_path), "b", ("sweep",))
    summary = json.loads((tmp_path / "b" / "sweep" / "summary.json").read_text())
    # FIFO runs every trial 2 epochs: without the budget, 8 trials and 16 trial-epochs. The
    # concurrent trial may report once more while the stop is carried out.
    assert 5 <= summary["trial_epochs"] <= 6, summary["trials"]
    assert len(summary["trials"]) <= 4
    assert summary["trial_epoch_budget"] == 5


def test_trials_as_ray_train_runs_report_each_epoch_to_the_scheduler(tmp_path, local_ray):
    cfg = load_config(DEMO, [
        "sweep.num_trials=2", "sweep.epochs=2", "sweep.trial_workers=1", "sweep.mlflow=false",
        f"teacher.arch={SMALL}", "teacher.batch_size=64",
    ])
    pipeline.run_stages(cfg, str(tmp_path), "rt", ("sweep",))
    out = tmp_path / "rt" / "sweep"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trial_workers"] == 1 and len(summary["trials"]) == 2
    for trial in summary["trials"]:
        assert trial["status"] in ("completed", "stopped_early"), trial
        assert len(trial["history"]) == trial["epochs"] >= 1
    # Rank 0's per-epoch report reached Tune with every trial metric (val_loss too).
    first_reports = [json.loads(r.read_text().splitlines()[0]) for r in (out / "ray" / "tune").glob("*/result.json")]
    assert len(first_reports) == 2 and all({"val_accuracy", "val_loss", "loss"} <= set(r) for r in first_reports)
    # Each trial was a Ray Train run of its own (Train V2 keeps one folder per run).
    runs = sorted(p.name for p in (out / "ray" / "train").iterdir() if p.name.startswith("trial-"))
    assert len(runs) == 2
    assert load_config(out / "best.yaml").sweep.trial_workers == 1


# ---- a killed driver, resumed --------------------------------------------------------------


def _finished_trials(experiment: Path) -> dict[str, str]:
    """Trial id -> sha256 of its result.json, for the trials Tune's saved experiment state
    records as TERMINATED (what a restore will keep)."""
    found = {}
    for trial_id in terminated_tune_trials(experiment):
        result = next(experiment.glob(f"*{trial_id}*/result.json"), None)
        if result is not None:
            found[trial_id] = hashlib.sha256(result.read_bytes()).hexdigest()
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, and any of its descendants that left it."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=60)


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    # Tune saves its experiment state every couple of seconds: with few, fast trials it may
    # record two finished only once all have, so there are trials enough to outlast that.
    trials = 8
    cmd = [sys.executable, "-m", "raydistill.cli", "sweep", "--config", str(DEMO), "--storage", str(tmp_path),
           "--name", "r", "--set", f"sweep.num_trials={trials}", "--set", "sweep.epochs=1", "--set", "sweep.scheduler=fifo",
           "--set", "sweep.max_concurrent_trials=1", "--set", "sweep.mlflow=false",
           "--set", f"teacher.arch={SMALL}"]
    experiment = tmp_path / "r" / "sweep" / "ray" / "tune"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and len(_finished_trials(experiment)) < 2 and proc.poll() is None:
            time.sleep(0.5)
    finally:
        _kill_tree(proc)
    before = _finished_trials(experiment)
    assert len(before) >= 2, (tmp_path / "first.log").read_text()[-3000:]
    assert not (tmp_path / "r" / "sweep" / "summary.json").exists(), "the sweep finished before it was killed"

    out = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming the interrupted sweep" in out.stdout
    summary = json.loads((tmp_path / "r" / "sweep" / "summary.json").read_text())
    assert summary["resumed"] is True
    assert len(summary["trials"]) == trials and all(t["status"] == "completed" for t in summary["trials"])
    ids = {t["trial_id"] for t in summary["trials"]}
    assert set(before) <= ids
    # A trial run again would have written its result.json anew.
    after = _finished_trials(experiment)
    assert {k: after[k] for k in before} == before

