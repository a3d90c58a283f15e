"""Sweep: Bayesian search (Optuna TPE or GP) with ASHA early stopping over the teacher's
optimiser settings. Each trial trains the teacher architecture on augmented views and reports
validation accuracy every epoch, so the scheduler can stop poor trials early.
"""

from __future__ import annotations

import numpy as np

from raydistill.config import Config, SweepConfig

METRIC, MODE = "val_accuracy", "max"
# Config keys the search space covers, mapped to (low, high) fields of SweepConfig.
SPACE = {"teacher.lr": ("lr_min", "lr_max"), "teacher.weight_decay": ("weight_decay_min", "weight_decay_max")}


def sweep_trial(params: dict, base: dict, data) -> None:
    """One Tune trial: train in this process, report val accuracy per epoch."""
    import torch
    import torch.nn.functional as F
    from ray import tune

    from raydistill.data import augment_batch
    from raydistill.models import ModelSpec, accuracy, build_network, recalibrate_batchnorm
    from raydistill.training import set_threads

    cfg = Config.model_validate(base).with_values(params)
    (train_x, train_y), (val_x, val_y), num_classes = data
    spec = ModelSpec(cfg.teacher.arch, num_classes, tuple(train_x.shape[1:]), cfg.data.image_size)
    set_threads(cfg.sweep.cpus_per_trial)
    torch.manual_seed(cfg.seed)
    net = build_network(spec)
    bs, epochs = cfg.teacher.batch_size, cfg.sweep.epochs
    steps_per_epoch = max(1, len(train_y) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.teacher.lr, weight_decay=cfg.teacher.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.teacher.lr, total_steps=epochs * steps_per_epoch,
        pct_start=max(0.01, cfg.teacher.warmup_fraction),
    )
    augment = cfg.data.augment.model_dump()
    ids = np.arange(len(train_y))
    for epoch in range(epochs):
        net.train()
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(train_y))
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            batch = augment_batch(
                {"image": train_x[idx], "label": train_y[idx], "id": ids[idx]},
                seed=cfg.seed, epoch=epoch, image_size=cfg.data.image_size, augment=augment,
            )
            loss = F.cross_entropy(net(torch.from_numpy(batch["image"])), torch.from_numpy(batch["label"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        recalibrate_batchnorm(net, train_x, spec.image_size)
        tune.report({METRIC: accuracy(net, val_x, val_y, spec.image_size), "loss": loss.item(), "epoch": epoch + 1})


def _searcher(scfg: SweepConfig, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, scfg.num_trials)),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(4, scfg.num_trials)),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return OptunaSearch(metric=METRIC, mode=MODE, sampler=samplers[scfg.searcher]())


def _scheduler(scfg: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if scfg.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=scfg.epochs, grace_period=1, reduction_factor=2)
    if scfg.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=scfg.epochs)
    return FIFOScheduler()


def run_sweep(cfg: Config, data, out_dir) -> tuple[dict, Config]:
    """Run the search; return (summary, the teacher config with the best values applied)."""
    from ray import tune

    scfg = cfg.sweep
    space = {key: tune.loguniform(getattr(scfg, lo), getattr(scfg, hi)) for key, (lo, hi) in SPACE.items()}
    trainable = tune.with_resources(
        tune.with_parameters(
            sweep_trial,
            base=cfg.model_dump(mode="json"),
            data=((data.train.images, data.train.labels), (data.val.images, data.val.labels), data.num_classes),
        ),
        {"cpu": scfg.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=_searcher(scfg, cfg.seed), scheduler=_scheduler(scfg),
            num_samples=scfg.num_trials, reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out_dir / "ray"), verbose=1),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        epochs = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
        status = "error" if result.error else ("stopped_early" if epochs < scfg.epochs else "completed")
        trials.append({
            "config": {k: result.config[k] for k in SPACE},
            "status": status,
            "metric": result.metrics.get(METRIC) if result.metrics else None,
            "epochs": epochs,
        })
    finished = [t for t in trials if t["metric"] is not None]
    if not finished:
        errors = "; ".join(str(r.error)[:200] for r in grid if r.error)
        raise RuntimeError(f"sweep: no trial reported {METRIC} ({errors or 'no trials ran'})")
    best = max(finished, key=lambda t: (t["epochs"], t["metric"]))
    summary = {
        "searcher": scfg.searcher,
        "scheduler": scfg.scheduler,
        "metric": METRIC,
        "mode": MODE,
        "trials": trials,
        "best_config": best["config"],
        "best_metric": best["metric"],
        "trial_epochs": sum(t["epochs"] for t in trials),
    }
    return summary, cfg.with_values(best["config"])
