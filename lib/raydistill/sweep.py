"""Sweep: Bayesian search (Optuna TPE or GP; random as the baseline) with early stopping (ASHA,
HyperBand or FIFO) over a search space declared in the config (`raydistill.space`).

A trial trains the teacher architecture on augmented views and reports the metric every epoch,
so the scheduler can stop poor trials early. Two kinds of trial:

- in-process (`sweep.trial_workers: 0`): the trial trains inside its Tune actor; cheapest for
  small models, and many trials share a small machine;
- Ray Train (`sweep.trial_workers: N`): the trial is a Tune function that launches a
  TorchTrainer of the real teacher loop (DeepSpeed ZeRO, Ray Data stream) on N workers, the way
  Ray Train V2 runs inside Tune: the trial driver holds 0 CPUs, the workers hold theirs, and
  `TuneReportCallback` forwards rank 0's per-epoch reports to the scheduler. A stopped trial's
  driver actor is killed, and its Train controller and workers (owned by it) go with it.

Outputs (sweep/): summary.json, best.yaml (by the pipeline), progress.png (best metric so far
against cumulative trial-epochs), and an MLflow run per trial (sweep/mlflow by default).
A driver that is stopped can be continued with `--resume` (Tuner.restore): finished trials
keep their results and are not run again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from ray.tune.stopper import Stopper

from raydistill.artifacts import atomic_write, write_text
from raydistill.config import Config, ConfigError, SweepConfig
from raydistill.console import log
from raydistill.training import releasing_placement_groups

EXPERIMENT = "tune"  # out_dir/ray/tune: the Tune experiment (what --resume restores)
TIME_ATTR = "epoch"  # every trial report carries its epoch: the schedulers' clock


# ---- trials ---------------------------------------------------------------------------------


def trial_in_process(params: dict, base: dict, data) -> None:
    """One Tune trial trained in this actor: reports val_accuracy, val_loss and loss every epoch."""
    from ray import tune

    cfg = Config.model_validate(base).with_values(params)
    train_in_process(cfg, data, lambda metrics: tune.report({**metrics, "reported_at": time.time()}))


def train_in_process(cfg: Config, data, report) -> None:
    """The teacher stage's recipe at the sweep's budget, in this process: the same DeepSpeed
    engine config (optimizer, LR schedule, clipping, ZeRO stage) at world size 1, with the
    teacher's global batch kept by accumulating over its workers' micro-batches, the same
    loop (loop.fit with cross-entropy) and the rows a single trainer would stream. Calls
    report(metrics) every epoch. `data` is the data.Dataset index; rows are read a row group
    at a time."""
    from raydistill.augment import local_batches
    from raydistill.loop import CrossEntropy, fit
    from raydistill.models import recalibrate_batchnorm
    from raydistill.training import (BN_ROWS, EvalAdapter, set_threads, single_process_group, teacher_engine,
                                     teacher_recipe, validation_metrics)

    cfg = cfg.with_values(trial_overrides(cfg, in_process=True))
    tcfg = cfg.teacher
    recipe = teacher_recipe(cfg, data.num_classes, data.input_shape, len(data.train))
    spec, plan = recipe.spec, recipe.plan
    set_threads(cfg.sweep.cpus_per_trial)
    single_process_group()
    engine = teacher_engine(recipe)
    adapter = EvalAdapter(engine, engine.device)
    bn_images = data.train.head(BN_ROWS).images
    batches = local_batches(recipe.views, data.train, plan.epochs, plan.rows_per_epoch(1, tcfg.batch_size),
                            tcfg.batch_size, data.num_classes)

    def after_step(step: int, epoch_loss: float | None) -> None:
        if epoch_loss is None:
            return
        recalibrate_batchnorm(engine.module, bn_images, spec.image_size, forward=adapter)
        report({**validation_metrics(adapter, data, spec.image_size), "loss": epoch_loss,
                TIME_ATTR: step // plan.steps_per_epoch})

    fit(engine, CrossEntropy(), batches, plan, after_step)


def trial_config(cfg: Config, params: dict) -> Config:
    """The teacher config one Ray Train trial runs: the sampled values and trial_overrides."""
    return cfg.with_values({**params, **trial_overrides(cfg, in_process=False)})


def trial_overrides(cfg: Config, in_process: bool) -> dict:
    """What a trial sets itself on top of the sampled values: the sweep's epoch budget, its
    workers (an in-process trial is one process that keeps the teacher's global batch by
    accumulating over the teacher's workers' micro-batches), and no mid-run checkpoints (a
    stopped trial is not resumed: the searcher samples a new one)."""
    tcfg = cfg.teacher
    if in_process:
        return {"teacher.epochs": cfg.sweep.epochs, "teacher.num_workers": 1, "teacher.global_batch_size": None,
                "teacher.grad_accum_steps": tcfg.grad_accum_steps * tcfg.num_workers}
    return {"teacher.num_workers": cfg.sweep.trial_workers, "teacher.epochs": cfg.sweep.epochs,
            "teacher.global_batch_size": None, "teacher.checkpoint_every_steps": 10**9, "teacher.max_failures": 0}


def check_swept_keys(cfg: Config) -> None:
    """Refuse a swept key that changes nothing a trial trains, so that its "best" value would
    be noise: a key the trial replaces with its own value (trial_overrides), or one the
    trial's recipe does not read at all (another stage's key, or one that changes only speed).
    Derived from the recipe the trial trains (training.teacher_recipe), resolved at each of
    the key's bounds or choices on placeholder data. Raises ConfigError naming the key."""
    from raydistill.training import teacher_recipe

    if not cfg.sweep.num_trials:
        return
    if cfg.is_text and cfg.sweep.trial_workers == 0:
        raise ConfigError("sweep.trial_workers: a text task's trials run on Ray Train; set it to 1 or more")
    in_process = cfg.sweep.trial_workers == 0
    kind = "in-process trials (sweep.trial_workers: 0)" if in_process else \
        f"Ray Train trials (sweep.trial_workers: {cfg.sweep.trial_workers})"
    shape = (cfg.data.channels or 3, cfg.data.image_size, cfg.data.image_size)
    rows = 10**7  # enough for a step at any batch: only the recipe's dependence on the key matters

    def recipe_at(key: str, value):
        try:
            trial = cfg.with_values({key: value})
            trial = trial.with_values(trial_overrides(trial, in_process))
        except ConfigError as err:  # e.g. a frozen backbone for all of the trial's sweep.epochs
            raise ConfigError(f"sweep.space.{key}={value} in {kind}: {err}") from None
        if cfg.is_text:
            from raydistill.text.train import trial_recipe

            return trial_recipe(trial)
        return teacher_recipe(trial, max(2, cfg.data.num_classes), shape, rows)

    for key, dist in cfg.sweep.space.items():
        recipes = [recipe_at(key, value) for value in dist.values_to_check()]
        if all(r == recipes[0] for r in recipes[1:]):
            why = f"{kind} set {key} themselves" if key in trial_overrides(cfg, in_process) else \
                f"the recipe a sweep trial trains does not read {key}"
            raise ConfigError(f"sweep.space.{key}: {why}, so sweeping it changes nothing")


def _timed_report_callback():
    """Train V2's TuneReportCallback, stamping each report with the time it reached the driver
    (Tune's own `timestamp` has 1 s resolution; the progress curve orders reports by this)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TimedTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            stamped = [{**metrics[0], "reported_at": time.time()}, *metrics[1:]]
            super().after_report(run_context, stamped, checkpoint)

    return TimedTuneReportCallback()


def trial_on_ray_train(params: dict, base: dict, data, storage: str) -> None:
    """One Tune trial that is a Ray Train run of the teacher loop on `sweep.trial_workers` workers."""
    import uuid

    from ray import tune
    from ray.train import FailureConfig, RunConfig

    from raydistill.augment import train_stream
    from raydistill.training import fit_trainer, teacher_recipe, teacher_worker, torch_trainer

    cfg = trial_config(Config.model_validate(base), params)
    tcfg = cfg.teacher
    recipe = teacher_recipe(cfg, data.num_classes, data.input_shape, len(data.train))
    spec, plan = recipe.spec, recipe.plan
    fit_id = uuid.uuid4().hex
    Path(storage).mkdir(parents=True, exist_ok=True)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "spec": spec.__dict__, "plan": plan.__dict__, "data": data,
        "fit_id": fit_id, "attempts_file": str(Path(storage) / f"attempts-{fit_id}.log"),
    }
    stream = train_stream(cfg, data.train, tcfg.epochs, plan.rows_per_epoch(tcfg.num_workers, tcfg.batch_size),
                          num_classes=data.num_classes)
    run_config = RunConfig(
        name=f"trial-{tune.get_context().get_trial_id()}", storage_path=storage,
        failure_config=FailureConfig(max_failures=0), callbacks=[_timed_report_callback()],
    )
    fit_trainer(torch_trainer(teacher_worker, loop_config, tcfg, {"train": stream}, run_config), "sweep trial",
                release=False)  # beside other trials of this job: the sweep releases once Tune returns


# ---- search -------------------------------------------------------------------------------


def _searcher(scfg: SweepConfig, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    startup = scfg.resolved_startup_trials
    samplers = {
        # multivariate: one joint density over the space, not one per dimension (lr and batch
        # size, lr and warmup interact); constant_liar: running trials count as bad results
        # while they run, so concurrent trials are not all proposed at the same point.
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                                  constant_liar=True),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return OptunaSearch(metric=scfg.metric, mode=scfg.resolved_mode, sampler=samplers[scfg.searcher]())


def _scheduler(scfg: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if scfg.scheduler == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=scfg.epochs, grace_period=min(scfg.grace_period, scfg.epochs),
                             reduction_factor=scfg.reduction_factor)
    if scfg.scheduler == "hyperband":
        return HyperBandScheduler(time_attr=TIME_ATTR, max_t=scfg.epochs, reduction_factor=scfg.reduction_factor)
    return FIFOScheduler()


class TrialEpochBudget(Stopper):
    """A Tune stopper: ends the sweep once all its trials together have reported `budget`
    epochs. The count lives in a JSON ledger beside the experiment, so a sweep continued with
    --resume goes on counting from where the killed driver stopped."""

    def __init__(self, budget: int, ledger: Path):
        self.budget, self.ledger, self.epochs = budget, ledger, None

    def __getstate__(self) -> dict:  # Tune pickles its stoppers: re-read the ledger after a restore
        return {**self.__dict__, "epochs": None}

    def _load(self) -> dict:
        if self.epochs is None:
            self.epochs = json.loads(self.ledger.read_text()) if self.ledger.exists() else {}
        return self.epochs

    def spent(self) -> int:
        return sum(self._load().values())

    def __call__(self, trial_id: str, result: dict) -> bool:
        epochs = self._load()
        epochs[trial_id] = max(epochs.get(trial_id, 0), int(result.get(TIME_ATTR) or 0))
        write_text(self.ledger, json.dumps(epochs))
        return False  # no single trial is stopped here; the schedulers decide that

    def stop_all(self) -> bool:
        return self.spent() >= self.budget


def trial_cpus(cfg: Config) -> float:
    """CPUs one running trial occupies: its workers, plus a Ray Data task for Ray Train trials."""
    if cfg.sweep.trial_workers == 0:
        return cfg.sweep.cpus_per_trial
    return cfg.sweep.trial_workers * cfg.teacher.cpus_per_worker + cfg.data.cpus_per_task


def max_concurrent(cfg: Config, cluster_cpus: float, cluster_gpus: float = 0) -> int:
    """Trials that fit the cluster at once (sweep.max_concurrent_trials caps it when set).
    More would only queue their workers, and a queued trial's driver holds nothing useful."""
    fit = math.floor(cluster_cpus / trial_cpus(cfg) + 1e-9)
    if cfg.sweep.trial_workers and cfg.teacher.use_gpu:  # one GPU per Ray Train worker
        fit = min(fit, math.floor(cluster_gpus / cfg.sweep.trial_workers + 1e-9))
    fit = max(1, fit)
    return min(fit, cfg.sweep.max_concurrent_trials) if cfg.sweep.max_concurrent_trials else fit


def check_sweep(cfg: Config, data) -> None:
    """What a sweep can refuse before Ray starts (the space itself was checked at load)."""
    if cfg.is_text:
        from raydistill.text.train import check_teacher

        return check_teacher(trial_config(cfg, {}), data)
    if cfg.sweep.trial_workers:
        from raydistill.training import StepPlan, teacher_spec
        from raydistill.models import describe_network

        try:
            tcfg = trial_config(cfg, {}).teacher
        except ConfigError as err:
            raise ConfigError(f"sweep.trial_workers={cfg.sweep.trial_workers}: {err}") from None
        describe_network(teacher_spec(cfg, data))
        batch_sizes = [tcfg.batch_size]
        if "teacher.batch_size" in cfg.sweep.space:
            batch_sizes = cfg.sweep.space["teacher.batch_size"].values_to_check()
        for bs in batch_sizes:
            try:
                StepPlan.of(len(data.train), tcfg.num_workers, int(bs), tcfg.epochs, tcfg.grad_accum_steps)
            except ValueError as err:
                raise ConfigError(f"sweep.trial_workers: {err}") from None


def _trainable(cfg: Config, data, out_dir: Path):
    from ray import tune

    base = cfg.model_dump(mode="json")
    if cfg.is_text:
        from raydistill.text.train import worker_config

        base = worker_config(cfg)  # a trial runs in its own folder: a relative teacher folder is resolved here
    if cfg.sweep.trial_workers == 0:
        fn = tune.with_parameters(trial_in_process, base=base, data=data)
        return tune.with_resources(fn, {"cpu": cfg.sweep.cpus_per_trial})
    if cfg.is_text:
        from raydistill.text.train import trial_on_ray_train as text_trial

    fn = tune.with_parameters(text_trial if cfg.is_text else trial_on_ray_train, base=base, data=data,
                              storage=str((out_dir / "ray" / "train").resolve()))
    # The trial driver only waits on its TorchTrainer: it must hold no CPU, or on a small
    # cluster the drivers take the CPUs their own workers need and nothing ever runs. Tune
    # refuses an all-zero request (an empty placement-group bundle), so it asks for 1 byte of
    # memory instead: a bundle that places the driver and reserves nothing that matters.
    return tune.with_resources(fn, {"cpu": 0, "memory": 1})


def mlflow_uri(cfg: Config, out_dir: Path) -> str | None:
    if not cfg.sweep.mlflow:
        return None
    return cfg.sweep.mlflow_tracking_uri or (out_dir / "mlflow").resolve().as_uri()


def _callbacks(cfg: Config, out_dir: Path, run_name: str) -> list:
    """One MLflow run per trial (params, per-epoch metrics), in experiment raydistill-<run>."""
    uri = mlflow_uri(cfg, out_dir)
    if uri is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked (it wants a database). A folder in the
        # run needs no server and `mlflow ui --backend-store-uri <it>` reads it as is.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=f"raydistill-{run_name}",
                                 tags={"stage": "sweep", "searcher": cfg.sweep.searcher,
                                       "scheduler": cfg.sweep.scheduler},
                                 save_artifact=False)]


def _tuner(cfg: Config, data, out_dir: Path, resume: bool, run_name: str):
    """A new Tuner, or the interrupted one restored (with --resume)."""
    import ray
    from ray import tune

    scfg = cfg.sweep
    storage = (out_dir / "ray").resolve()
    # Tune saves the experiment state (what --resume restores) at most every 10 s by default;
    # a driver killed in between would run the trials finished since then again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    path = storage / EXPERIMENT
    trainable = _trainable(cfg, data, out_dir)
    space = {key: dist.to_tune() for key, dist in scfg.space.items()}
    # The sweep config the experiment was started with: --resume continues only that one.
    stamp = storage / "sweep_digest.txt"
    same = stamp.exists() and stamp.read_text().strip() == cfg.stage_digest("sweep")
    if path.exists():
        if resume and same and tune.Tuner.can_restore(str(path)):
            log(f"sweep: resuming the interrupted sweep in {path} (finished trials are kept)")
            return tune.Tuner.restore(str(path), trainable=trainable, param_space=space,
                                      resume_unfinished=True, resume_errored=False, restart_errored=True), True
        why = ("it was started with another sweep config" if resume and not same
               else "" if resume else "rerun with --resume to continue it instead")
        log(f"sweep: an earlier, unfinished sweep is in {path}; starting afresh" + (f" ({why})" if why else ""))
        shutil.rmtree(path)
    elif resume:
        log("sweep: --resume: no interrupted sweep to continue; starting one")
    storage.mkdir(parents=True, exist_ok=True)
    write_text(stamp, cfg.stage_digest("sweep") + "\n")
    resources = ray.cluster_resources()
    concurrent = max_concurrent(cfg, resources.get("CPU", 1), resources.get("GPU", 0))
    callbacks = _callbacks(cfg, out_dir, run_name)
    ledger = storage / "trial_epochs.json"
    ledger.unlink(missing_ok=True)  # a fresh sweep; a resumed one keeps counting (restored above)
    stop = TrialEpochBudget(scfg.trial_epoch_budget, ledger) if scfg.trial_epoch_budget else None
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=scfg.metric, mode=scfg.resolved_mode, search_alg=_searcher(scfg, cfg.seed),
            scheduler=_scheduler(scfg), num_samples=scfg.num_trials, max_concurrent_trials=concurrent,
            time_budget_s=scfg.time_budget_s, reuse_actors=scfg.trial_workers == 0,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), verbose=1, callbacks=callbacks,
                                  stop=stop),
    )
    budget = f" or {scfg.trial_epoch_budget} trial-epochs, whichever comes first" if stop else ""
    log(f"sweep: {scfg.num_trials} trials{budget}, {scfg.searcher} + {scfg.scheduler}, "
        f"{'in-process' if scfg.trial_workers == 0 else f'Ray Train on {scfg.trial_workers} worker(s)'} "
        f"trials, up to {concurrent} at once")
    return tuner, False


# ---- results --------------------------------------------------------------------------------


def _history(result, metric: str) -> list[dict]:
    """A trial's reports, one per epoch (a Ray Train trial's final report repeats its last
    epoch), in the order they arrived."""
    df = result.metrics_dataframe
    if df is None or df.empty or metric not in df or TIME_ATTR not in df:
        return []
    rows, seen = [], set()
    for _, row in df.iterrows():
        epoch, value = row[TIME_ATTR], row[metric]
        if epoch is None or value is None or (isinstance(value, float) and math.isnan(value)) or epoch in seen:
            continue
        seen.add(epoch)
        at = row.get("reported_at")
        at = float(at) if at is not None and not (isinstance(at, float) and math.isnan(at)) else float(row["timestamp"])
        rows.append({"epoch": int(epoch), "metric": float(value), "at": at})
    return rows


def progress_curve(histories: list[list[dict]], mode: str) -> list[list[float]]:
    """[[cumulative trial-epochs, best metric so far], ...] over all trials' reports in the
    order they arrived: what the search has found for the compute it has spent."""
    reports = sorted((r for h in histories for r in h), key=lambda r: r["at"])
    better = max if mode == "max" else min
    curve, best = [], None
    for spent, r in enumerate(reports, start=1):
        best = r["metric"] if best is None else better(best, r["metric"])
        curve.append([spent, best])
    return curve


def plot_progress(curves: dict[str, list], path: Path, metric: str, title: str) -> Path:
    """Best metric so far against cumulative trial-epochs, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    # "method, seed n" labels: one colour per method, one line style per seed.
    methods = list(dict.fromkeys(label.split(",")[0] for label in curves))
    styles, drawn = ["-", "--", ":", "-."], {}
    for label, curve in curves.items():
        if curve:
            method = label.split(",")[0]
            style = styles[drawn.get(method, 0) % len(styles)]
            drawn[method] = drawn.get(method, 0) + 1
            xs, ys = zip(*curve)
            ax.step(xs, ys, where="post", label=label, color=f"C{methods.index(method)}", linestyle=style)
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel(f"best {metric} so far")
    if metric.endswith("loss"):
        ax.set_yscale("log")  # a loss falls over decades; on a linear axis the late gains look flat
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def summarize(grid, cfg: Config, resumed: bool) -> dict:
    scfg = cfg.sweep
    metric, mode = scfg.metric, scfg.resolved_mode
    trials, histories = [], []
    for result in grid:
        history = _history(result, metric)
        epochs = max((h["epoch"] for h in history), default=0)
        status = "error" if result.error else ("completed" if epochs >= scfg.epochs else "stopped_early")
        values = [h["metric"] for h in history]
        trials.append({
            "trial_id": result.metrics.get("trial_id") if result.metrics else None,
            "config": {k: result.config[k] for k in scfg.space},
            "status": status,
            "metric": values[-1] if values else None,
            "epochs": epochs,
            "history": values,
        })
        histories.append(history)
    finished = [t for t in trials if t["metric"] is not None]
    if not finished:
        errors = "; ".join(str(r.error).strip().splitlines()[-1][:300] for r in grid if r.error)
        raise RuntimeError(f"sweep: no trial reported {metric} ({errors or 'no trials ran'})")
    sign = 1 if mode == "max" else -1
    # Among the trials that ran longest: an early-stopped trial's metric is from fewer epochs.
    best = max(finished, key=lambda t: (t["epochs"], sign * t["metric"]))
    return {
        "searcher": scfg.searcher,
        "scheduler": scfg.scheduler,
        "metric": metric,
        "mode": mode,
        "trial_workers": scfg.trial_workers,
        "trials": trials,
        "best_config": best["config"],
        "best_metric": best["metric"],
        "trial_epochs": sum(t["epochs"] for t in trials),
        "curve": progress_curve(histories, mode),
        "time_budget_s": scfg.time_budget_s,
        "trial_epoch_budget": scfg.trial_epoch_budget,
        "resumed": resumed,
    }


def run_sweep(cfg: Config, data, out_dir: Path, resume: bool = False, run_name: str = "sweep") -> tuple[dict, Config]:
    """Run (or with `resume`, continue) the search; return (summary, the config with the best
    values applied). Writes progress.png beside the summary."""
    check_sweep(cfg, data)
    tuner, resumed = _tuner(cfg, data, out_dir, resume, run_name)
    with releasing_placement_groups():
        grid = tuner.fit()
    summary = summarize(grid, cfg, resumed)
    summary["mlflow_tracking_uri"] = mlflow_uri(cfg, out_dir)
    summary["majority_val_accuracy"] = data.majority("val")  # the bar val_accuracy must clear
    plot = plot_progress({f"{cfg.sweep.searcher} + {cfg.sweep.scheduler}": summary["curve"]},
                         out_dir / "progress.png", summary["metric"], "sweep progress")
    summary["plot"] = plot.name
    return summary, cfg.with_values(summary["best_config"])
