"""Teacher training: Ray Train TorchTrainer workers running a DeepSpeed ZeRO engine on
augmented views streamed from Ray Data.

Pieces shared with the student stage (the step plan, the stream loop, epoch logs, the
trainer factory) live here too.
"""

from __future__ import annotations

import contextlib

import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from raydistill.config import Config
from raydistill.models import predict_logits


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes: every worker must take exactly as many."""

    epochs: int
    steps_per_epoch: int
    accum: int = 1  # micro-batches per optimizer step

    @classmethod
    def of(cls, n_train: int, world_size: int, batch_size: int, epochs: int, accum: int = 1) -> "StepPlan":
        per_epoch = n_train // (world_size * batch_size * accum)
        if per_epoch < 1:
            raise ValueError(
                f"{n_train} training rows cannot fill one step of {batch_size} x {accum} micro-batches "
                f"on each of {world_size} workers: lower batch_size, grad_accum_steps or num_workers"
            )
        return cls(epochs=epochs, steps_per_epoch=per_epoch, accum=accum)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def rows_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Rows one epoch streams: exactly the full batches all workers consume."""
        return self.steps_per_epoch * self.accum * world_size * batch_size


def validation_metrics(net, data, image_size: int, rank: int = 0, world: int = 1) -> dict:
    """val_accuracy and val_loss (mean cross-entropy) over the stored validation split, sharded
    across the ranks (every rank calls this together). The loss is continuous: it still ranks
    two models whose accuracy on a few hundred images ties, which a sweep's searcher and
    scheduler need."""
    from raydistill.evaluate import split_metrics

    m = split_metrics(net, data.val, image_size, rank, world)
    return {"val_accuracy": m["accuracy"], "val_loss": m["loss"]}


class DataWait:
    """How long a training loop waits for its next batch, against the time of its steps.

    `wait_s`: time spent inside the stream's next() (Ray Data had no batch ready); `step_s`:
    time of the training steps themselves (forward, backward, optimizer; the loop adds it with
    `timed`). Epoch-end evaluation and checkpoints count in neither, so the fraction is of
    training-step time only. The first batch is counted apart: it includes the pipeline's
    start-up, not its steady state."""

    def __init__(self):
        self.first_s = None
        self.wait_s = self.step_s = 0.0
        self.batches = 0

    def timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.step_s += time.perf_counter() - t0
        return out

    def wrap(self, iterable):
        it = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            t1 = time.perf_counter()
            if self.first_s is None:
                self.first_s = t1 - t0
            else:
                self.wait_s += t1 - t0
                self.batches += 1
            yield item

    def start_over(self) -> None:
        """Count what was drawn so far (batches skipped on a resume) as start-up, not as waits."""
        self.first_s = (self.first_s or 0.0) + self.wait_s
        self.wait_s, self.batches = 0.0, 0

    @property
    def fraction(self) -> float:
        """Share of step time spent waiting for data, after the first batch."""
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    def metrics(self) -> dict:
        first = self.first_s or 0.0
        with_start = (self.wait_s + first) / max(1e-9, self.wait_s + first + self.step_s)
        return {"data_wait_fraction": self.fraction, "data_wait_ms_per_step": 1e3 * self.wait_s / max(1, self.batches),
                "data_first_batch_s": first, "data_wait_fraction_with_start": with_start}


def stream_batches(shard, batch_size: int, total_steps: int, device, skip: int = 0, prefetch_batches: int = 4,
                   wait: DataWait | None = None):
    """(step, {column: tensor on device}) from a Ray Data shard, stopping at exactly total_steps.

    `skip` batches are drawn and dropped first: a run resumed from a checkpoint at step k
    consumes the same stream (augmentation is seeded per epoch and row) and continues at k+1.
    Columns: image, label (class ids (B,) or, with mixup / cutmix, soft labels (B, classes);
    cross-entropy takes either), id, and whatever else the stream carries (the student's
    teacher_logits offline). `wait` (a DataWait) measures the time spent waiting for each batch.
    """
    step = 0
    batches = shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches)
    if wait is not None:
        batches = wait.wrap(batches)
    for batch in batches:
        if step >= total_steps:
            break
        step += 1
        if step > skip:
            if step == skip + 1 and skip and wait is not None:
                wait.start_over()
            yield step, {k: v.to(device) for k, v in batch.items()}


class EpochLog:
    """Progress on rank 0: a line per epoch (loss, accuracy, samples/s, ETA) on stdout, the
    same scalars in TensorBoard (when given a log dir) and as Ray metrics for the dashboard."""

    def __init__(self, stage: str, plan: StepPlan, global_batch: int, rank: int,
                 start_step: int = 0, tb_dir: str | None = None):
        self.stage, self.plan, self.global_batch, self.rank = stage, plan, global_batch, rank
        self.start_step = start_step
        self.start = time.perf_counter()
        self.tb = self.gauges = None
        if rank == 0 and tb_dir:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(tb_dir)
        if rank == 0:
            from ray.util.metrics import Gauge

            self.gauges = {}
            self._gauge = lambda name: self.gauges.setdefault(name, Gauge(
                f"raydistill_{stage}_{name}", description=f"{stage} {name} (rank 0)"))

    def samples_per_s(self, step: int) -> float:
        return (step - self.start_step) * self.global_batch / max(1e-9, time.perf_counter() - self.start)

    def say(self, text: str) -> None:
        if self.rank == 0:
            # Not print(): Train V2 patches it in workers to print *and* log, doubling each line.
            sys.stdout.write(f"[{self.stage}] {text}\n")
            sys.stdout.flush()

    def line(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        epoch = -(-step // self.plan.steps_per_epoch)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, step - self.start_step) * (self.plan.total_steps - step)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        speed = self.samples_per_s(step)
        self.say(f"epoch {epoch}/{self.plan.epochs} step {step}/{self.plan.total_steps} "
                 f"{shown} samples/s {speed:.0f} eta {eta:.0f}s")
        for name, value in {**metrics, "samples_per_s": speed}.items():
            self._gauge(name).set(float(value))
            if self.tb is not None:
                self.tb.add_scalar(f"{self.stage}/{name}", float(value), step)
        if self.tb is not None:
            self.tb.flush()


def set_threads(cpus: float) -> None:
    """Per-worker setup: torch threads for the worker's CPUs, and quieter Ray Train logs."""
    import logging
    import warnings

    import importlib.util

    torch.set_num_threads(max(1, int(cpus)))
    # DeepSpeed's ZeRO calls collectives that torch deprecates, and torch warns on every call:
    # dozens of identical lines per step that bury the progress lines.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # Train V2 logs two INFO lines per report from every rank ("Reporting training result",
    # "Checkpoint successfully created"); our progress lines say the same once, on rank 0.
    # The first comes from a logger named after its module's file, outside the "ray.train"
    # tree: found by name, not imported (a Ray internal; checked against Ray 2.60.0).
    report_logger = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    for name in ("ray.train", *([report_logger.origin] if report_logger else [])):
        logging.getLogger(name).setLevel(logging.WARNING)


BN_ROWS = 512  # clean training rows Precise BN re-estimates statistics on (models.recalibrate_batchnorm)


class WorkerStart(NamedTuple):
    cfg: Config
    spec: object  # models.ModelSpec
    plan: StepPlan
    data: object  # data.Dataset: the stored splits' index, read a row group at a time
    bn_images: object  # the first BN_ROWS clean training images, for Precise BN
    rank: int
    world: int
    device: torch.device


def worker_start(loop_config: dict, stage: str) -> WorkerStart:
    """What every worker of train_on_ray starts from (its torch threads set for its CPUs)."""
    import ray.train
    import ray.train.torch

    from raydistill.models import ModelSpec

    cfg = Config.model_validate(loop_config["cfg"])
    data = loop_config["data"]
    ctx = ray.train.get_context()
    set_threads(getattr(cfg, stage).cpus_per_worker)
    return WorkerStart(cfg, ModelSpec(**loop_config["spec"]), StepPlan(**loop_config["plan"]), data,
                       data.train.head(BN_ROWS).images, ctx.get_world_rank(), ctx.get_world_size(),
                       ray.train.torch.get_device())


def torch_trainer(loop, loop_config: dict, stage_cfg, datasets: dict, run_config):
    """A TorchTrainer (Train V2): gloo on CPU, NCCL on GPU."""
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Batches in the stream's order: a resumed run skips exactly the batches it trained on,
    # and a one-worker run sees what an in-process sweep trial of the same config sees.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if stage_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=stage_cfg.num_workers, use_gpu=stage_cfg.use_gpu,
            resources_per_worker={"CPU": stage_cfg.cpus_per_worker},
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
        run_config=run_config,
    )


def _placement_groups_of_this_job() -> set[str]:
    """Ids of this job's live placement groups (a placement group id ends with its job's id)."""
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {pg for pg, info in placement_group_table().items() if pg.endswith(job) and info["state"] != "REMOVED"}


@contextlib.contextmanager
def releasing_placement_groups():
    """Removes, on the way out, the placement groups this job created inside the block that are
    still there. Ray Train's cleaner is meant to remove a finished run's worker-group placement
    group, but it finds the cluster through the state API, which can resolve a stale address
    (an old /tmp/ray/ray_current_cluster) and give up: the workers' CPUs then stay reserved and
    the next stage waits forever. Only for a block after which nothing it started still runs."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    before = _placement_groups_of_this_job()
    try:
        yield
    finally:
        for pg in _placement_groups_of_this_job() - before:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))


def fit_trainer(trainer, stage: str, release: bool = True):
    """trainer.fit() with a clear error naming the stage when a worker fails. `release`: its
    placement groups are removed afterwards (releasing_placement_groups); a sweep trial, which
    runs beside others of the same job, leaves that to the sweep."""
    from ray.train import TrainingFailedError

    try:
        with releasing_placement_groups() if release else contextlib.nullcontext():
            result = trainer.fit()
    except TrainingFailedError as err:
        raise RuntimeError(f"{stage} training failed: {err}") from None
    if result.error is not None:
        raise RuntimeError(f"{stage} training failed: {result.error}")
    return result


def train_on_ray(stage: str, worker, cfg: Config, data, spec, out_dir: Path, extra: dict | None = None,
                 *, max_failures: int = 0, keep_checkpoints: int = 1, files: tuple[str, ...] = (),
                 stream=None, copy_to: Path | None = None):
    """Run `worker` on Ray Train over the stage's stream of augmented views.

    Ray Train keeps the run under out_dir/ray/<stage>-<config hash>: rerunning the same config
    finds its checkpoints (Train V2 restores a run with the same name and storage), a changed
    config starts afresh. `stream` replaces the default stream of augmented views (the student's
    offline mode passes the views joined with the teacher's logits). The worker saves
    `<stage>.safetensors` (and any `files`) into its
    final checkpoint; they are copied to out_dir (or `copy_to`). Returns (final metrics of rank 0, seconds):
    the driver never loads the trained network.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from raydistill.augment import train_stream
    from raydistill.models import describe_network

    stage_cfg = getattr(cfg, stage)
    describe_network(spec)  # an unknown arch fails here, before any worker starts
    plan = StepPlan.of(len(data.train), stage_cfg.num_workers, stage_cfg.batch_size, stage_cfg.epochs,
                       getattr(stage_cfg, "grad_accum_steps", 1))
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "spec": spec.__dict__, "plan": plan.__dict__, "data": data,
        **(extra or {}),
    }
    if stream is None:
        stream = train_stream(cfg, data.train, stage_cfg.epochs,
                              plan.rows_per_epoch(stage_cfg.num_workers, stage_cfg.batch_size),
                              num_classes=data.num_classes)
    run_config = RunConfig(
        name=f"{stage}-{cfg.stage_digest(stage)}", storage_path=str((out_dir / "ray").resolve()),
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
    )
    trainer = torch_trainer(worker, loop_config, stage_cfg, {"train": stream}, run_config)
    start = time.perf_counter()
    result = fit_trainer(trainer, stage)
    elapsed = time.perf_counter() - start
    for name in (f"{stage}.safetensors", *files):
        _copy_from_checkpoint(result, name, (copy_to or out_dir) / name)
    return result.metrics, elapsed


def _copy_from_checkpoint(result, filename: str, dest: Path) -> Path:
    import shutil

    if result.checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint holding {filename}")
    from raydistill.artifacts import atomic_write

    with result.checkpoint.as_directory() as ckpt:
        # Atomic: a killed copy must not leave a half file where the last good weights were.
        return atomic_write(dest, lambda tmp: shutil.copyfile(Path(ckpt) / filename, tmp))


# ---- teacher --------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherRecipe:
    """What a teacher run learns from, resolved from the config: the network, the step plan,
    the engine's recipe (optimizer, clipping, precision, ZeRO), the LR schedule, the
    fine-tuning groups and the views. The teacher stage and every sweep trial build their
    engine and views from this and read nothing else in the config that changes training, so
    a swept key whose values give equal recipes changes nothing a trial measures
    (sweep.check_swept_keys)."""

    spec: object  # models.ModelSpec
    plan: StepPlan
    seed: int
    weights: dict  # where the initial weights come from (teacher_network)
    engine: dict  # sharding.deepspeed_config
    schedule: dict  # loop.lr_schedule's kind and warmup
    groups: dict  # transfer.param_groups' fine-tuning settings
    views: dict  # augment.view_settings


def teacher_recipe(cfg: Config, num_classes: int, input_shape: tuple, n_train: int) -> TeacherRecipe:
    from raydistill import sharding
    from raydistill.augment import view_settings
    from raydistill.models import ModelSpec

    tcfg = cfg.teacher
    plan = StepPlan.of(n_train, tcfg.num_workers, tcfg.batch_size, tcfg.epochs, tcfg.grad_accum_steps)
    return TeacherRecipe(
        spec=ModelSpec(tcfg.arch, num_classes, tuple(input_shape), cfg.data.image_size),
        plan=plan,
        seed=cfg.seed,
        weights={"init_from": tcfg.init_from, "pretrained": tcfg.pretrained,
                 "activation_checkpointing": tcfg.activation_checkpointing},
        engine=sharding.deepspeed_config(tcfg, tcfg.num_workers),
        schedule=schedule_settings(tcfg),
        groups={"backbone_lr_scale": tcfg.backbone_lr_scale, "layer_decay": tcfg.layer_decay,
                "frozen_steps": tcfg.freeze_backbone_epochs * plan.steps_per_epoch},
        views=view_settings(cfg),
    )


def teacher_network(recipe: TeacherRecipe):
    from raydistill.models import build_network, load_matching

    spec, weights = recipe.spec, recipe.weights
    torch.manual_seed(recipe.seed)  # identical init on every rank before ZeRO partitions it
    net = build_network(spec)
    if weights["init_from"]:
        load_matching(net, weights["init_from"])
    if weights["pretrained"]:
        from raydistill import transfer

        path = transfer.weights_path(spec.arch, weights["pretrained"])
        transfer.load_pretrained(net, spec.arch, path, spec.num_classes, spec.input_shape[0])
    if weights["activation_checkpointing"]:
        net.set_grad_checkpointing(True)
    return net


def schedule_settings(tcfg) -> dict:
    return {"kind": tcfg.lr_schedule, "warmup_fraction": tcfg.warmup_fraction}


def teacher_schedule(tcfg, total_steps: int):
    """optimizer -> the teacher's LR scheduler (loop.lr_schedule), for sharding.wrap."""
    from raydistill.loop import lr_schedule

    return functools.partial(lr_schedule, total_steps=total_steps, **schedule_settings(tcfg))


def teacher_engine(recipe: TeacherRecipe):
    """The teacher network in its DeepSpeed engine, built from the recipe alone."""
    from raydistill import sharding, transfer
    from raydistill.loop import lr_schedule

    net = teacher_network(recipe)
    groups = transfer.param_groups(net, **recipe.groups)
    schedule = functools.partial(lr_schedule, total_steps=recipe.plan.total_steps, **recipe.schedule)
    return sharding.wrap(net, recipe.engine, schedule, params=groups)


def count_attempt(path: str) -> int:
    """This worker group's attempt number within one fit(), so that a restart is counted even
    when the worker died before the first checkpoint was registered. Rank 0 appends a line to a
    file in the run's storage: every node sees it (checkpoints need shared storage anyway) and
    it outlives any node, which an actor holding the count would not."""
    with open(path, "a") as f:
        f.write(f"{time.time():.3f}\n")
    return len(Path(path).read_text().splitlines())


def _kept_checkpoints(latest, rank: int) -> list:
    """The latest registered checkpoint, then the older ones Ray Train keeps beside it (newest
    first), to fall back on when the latest is corrupt. Rank 0 lists the folder and every rank
    gets its list, so all of them walk the same candidates. Folder names sort by time; newer
    ones than the latest are a save that was never registered, and are left out."""
    import pyarrow.fs as pafs
    import ray.train
    import torch.distributed as dist

    paths = [None]
    if rank == 0:
        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        found = latest.filesystem.get_file_info(pafs.FileSelector(parent))
        paths[0] = sorted((i.path for i in found if i.type == pafs.FileType.Directory
                           and i.base_name.startswith("checkpoint_") and i.path < latest.path), reverse=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(paths, src=0)
    return [latest, *(ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in paths[0])]


def _restore(engine, log: EpochLog, counters: dict, attempt: int, rank: int, world: int) -> int:
    """Continue from the latest checkpoint, if any: returns the step it was taken at.

    Attempt n > 1 of this fit() means workers died and Ray Train restarted the group; a
    checkpoint from an earlier fit() means the driver was stopped and rerun (a resume)."""
    import ray.train

    from raydistill import checkpoints

    checkpoint = ray.train.get_checkpoint()
    state = {}
    if checkpoint is not None:
        state = checkpoints.load_first_good(engine, _kept_checkpoints(checkpoint, rank), rank=rank,
                                            world_size=world, say=log.say)
    same_fit = state.get("fit_id") == counters["fit_id"]
    # Restarts of earlier fits carry over; this fit's are its attempts after the first.
    before = state.get("restarts_before", 0) if same_fit else state.get("restarts", 0)
    resumes = state.get("resumes", 0) + (bool(state) and not same_fit)
    counters.update(restarts_before=before, restarts=before + attempt - 1, resumes=resumes)
    where = f"from the checkpoint at step {state['step']}/{log.plan.total_steps}" if state else "from step 0 (no checkpoint yet)"
    if attempt > 1:
        log.say(f"restarted after a worker failure (attempt {attempt}) {where}")
    elif state:
        log.say(f"resumed {where}")
    return state.get("step", 0)


def _report(metrics: dict, engine=None, step: int = 0, counters: dict | None = None, rank_files=None) -> None:
    """ray.train.report from every rank; with an engine, each rank adds its checkpoint shard
    (and rank 0 any `rank_files(dir)` it writes) to one Ray Train checkpoint."""
    import ray.train

    from raydistill import checkpoints

    if engine is None:
        ray.train.report(metrics)
        return
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.save(engine, Path(tmp), rank=rank, world_size=world, step=step, counters=counters)
        if rank == 0 and rank_files is not None:
            rank_files(Path(tmp))
        has_files = any(Path(tmp).iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)


def single_process_group() -> None:
    """A gloo process group of one, for a DeepSpeed engine outside Ray Train (an in-process
    sweep trial): the same engine and recipe as the teacher's workers, at world size 1."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    # What a launcher (torchrun, Ray Train) would set, and DeepSpeed reads.
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def teacher_worker(loop_config: dict) -> None:
    """One Ray Train worker: ZeRO engine, streamed batches, per-epoch val accuracy, sharded
    checkpoints every N steps, and a consolidated export at the end."""
    import ray.train

    from raydistill import sharding
    from raydistill.artifacts import save_weights
    from raydistill.evaluate import split_metrics
    from raydistill.loop import CrossEntropy, fit
    from raydistill.models import recalibrate_batchnorm

    cfg, spec, plan, data, bn_images, rank, world, device = worker_start(loop_config, "teacher")
    tcfg = cfg.teacher
    engine = teacher_engine(teacher_recipe(cfg, data.num_classes, data.input_shape, len(data.train)))
    per_rank = sharding.gather_counts(sharding.local_param_count(engine))
    counters = {"fit_id": loop_config["fit_id"]}
    # Rank 0 counts the attempt: only its counters reach state.json and the final metrics.
    attempt = count_attempt(loop_config["attempts_file"]) if rank == 0 else 1
    log = EpochLog("teacher", plan, tcfg.batch_size * tcfg.grad_accum_steps * world, rank,
                   tb_dir=loop_config.get("tb_dir"))
    start_step = _restore(engine, log, counters, attempt, rank, world)
    log.start_step = start_step
    every = tcfg.checkpoint_every_steps
    adapter = EvalAdapter(engine, device)

    shard = ray.train.get_dataset_shard("train")
    shown, curve = {}, []
    wait = DataWait()
    micro_steps = stream_batches(shard, tcfg.batch_size, plan.total_steps * plan.accum, device,
                                 skip=start_step * plan.accum, prefetch_batches=cfg.data.prefetch_batches, wait=wait)

    def after_step(step: int, epoch_loss: float | None) -> None:
        nonlocal shown
        # The final step's checkpoint is the export below; between, every N steps (or epoch).
        save = step < plan.total_steps and (step % every == 0 if every else epoch_loss is not None)
        metrics = {"step": step, "epoch": -(-step // plan.steps_per_epoch)}
        if epoch_loss is not None:
            # Every rank runs the same forwards here: ZeRO-3 gathers parameters collectively.
            recalibrate_batchnorm(engine.module, bn_images, spec.image_size, forward=adapter)
            shown = {"loss": epoch_loss, **validation_metrics(adapter, data, spec.image_size, rank, world)}
            curve.append([step, epoch_loss])
            log.line(step, shown)
            metrics.update(shown, samples_per_s=log.samples_per_s(step))
        if save:
            _report(metrics, engine, step, counters)
            log.say(f"checkpoint at step {step} (every rank's shard; latest {tcfg.keep_checkpoints} kept)")
        elif epoch_loss is not None:
            _report(metrics)

    fit(engine, CrossEntropy(), micro_steps, plan, after_step, wait)

    # Export: gathered full weights, checked on rank 0 (a plain model must reproduce the
    # sharded engine's logits on a probe batch), and test accuracy, sharded like validation.
    recalibrate_batchnorm(engine.module, bn_images, spec.image_size, forward=adapter)
    state = sharding.consolidated_state_dict(engine)
    probe_images = data.val.head(64).images
    probe_logits = predict_logits(adapter, probe_images, spec.image_size)
    test = split_metrics(adapter, data.test, spec.image_size, rank, world)
    checked = export_check(spec, state, probe_images, probe_logits, tcfg.dtype_name) if rank == 0 else {}

    def export(directory: Path) -> None:
        save_weights(directory / "teacher.safetensors", state, spec.to_meta())

    # The last epoch's figures ride along, so every report with a checkpoint carries the metric
    # (a Tune scheduler reading these reports needs it in each).
    final = {**shown, "epoch": plan.epochs, "steps": plan.total_steps, "samples_per_s": log.samples_per_s(plan.total_steps),
             "params_per_rank": per_rank, "params_total": sharding.full_param_count(engine),
             "restarts": counters["restarts"], "resumes": counters["resumes"], "resumed_from_step": start_step,
             "test_accuracy": test["accuracy"], "export_check": checked, "loss_curve": curve, **wait.metrics()}
    _report(final, engine, plan.total_steps, counters, rank_files=export)


class EvalAdapter:
    """Lets models.accuracy call a DeepSpeed engine like a plain module."""

    def __init__(self, engine, device):
        self.engine, self.device = engine, device

    def eval(self):
        self.engine.eval()

    def __call__(self, x):
        return self.engine(x.to(self.device)).float().cpu()


def teacher_spec(cfg: Config, data):
    from raydistill.models import ModelSpec

    return ModelSpec(cfg.teacher.arch, data.num_classes, data.input_shape, cfg.data.image_size)


def check_teacher_network(cfg: Config, spec=None) -> dict:
    """The teacher refusals that need no data (checked before Ray starts): an unknown
    architecture, activation checkpointing it lacks, a missing init file or pretrained
    weights that are neither cached nor downloadable. Without `spec`, a
    stand-in for the data's classes and channels: these answers do not depend on them."""
    from raydistill.models import ModelSpec, describe_network

    tcfg = cfg.teacher
    size = cfg.data.image_size
    spec = spec or ModelSpec(tcfg.arch, max(2, cfg.data.num_classes), (cfg.data.channels or 3, size, size), size)
    info = describe_network(spec)  # meta device: a 1B-parameter teacher costs no memory here
    if tcfg.activation_checkpointing and not info["grad_checkpointing"]:
        raise ValueError(f"teacher.activation_checkpointing: timm's {tcfg.arch} does not support it")
    if tcfg.init_from and not Path(tcfg.init_from).is_file():
        raise ValueError(f"teacher.init_from {tcfg.init_from}: no such file")
    if tcfg.pretrained:
        from raydistill.transfer import weights_path

        weights_path(tcfg.arch, tcfg.pretrained)  # in the cache (or downloadable) before anything starts
    return info


def check_teacher(cfg: Config, spec, n_train: int) -> dict:
    """Everything about a teacher run that can be refused before a worker starts."""
    from raydistill import sharding
    from raydistill.models import init_file_matches

    tcfg = cfg.teacher
    info = check_teacher_network(cfg, spec)
    if tcfg.init_from:
        init_file_matches(tcfg.init_from, info["shapes"])
    StepPlan.of(n_train, tcfg.num_workers, tcfg.batch_size, tcfg.epochs, tcfg.grad_accum_steps)  # raises if no step fits
    sharding.validate(sharding.deepspeed_config(tcfg, tcfg.num_workers))
    return info


def export_check(spec, state: dict, probe_images, engine_logits: torch.Tensor, dtype_name: str) -> dict:
    """The consolidated weights in a plain torch model against the sharded engine's logits."""
    from raydistill.models import build_network

    net = build_network(spec)
    net.load_state_dict(state)  # copied into the fp32 model, whatever the engine's dtype
    logits = predict_logits(net, probe_images, spec.image_size)
    diff = float((logits - engine_logits).abs().max())
    # fp32 matches to rounding; 16-bit engines compute in bf16/fp16, the plain model in fp32.
    tolerance = 1e-4 if dtype_name == "fp32" else 0.05 * max(1.0, float(engine_logits.abs().max()))
    if diff > tolerance:
        raise RuntimeError(
            f"the consolidated teacher does not reproduce the sharded engine: logits differ by {diff:.3g} "
            f"(tolerance {tolerance:.3g})"
        )
    return {"max_abs_logit_diff": diff, "tolerance": tolerance, "probe_images": int(len(logits))}


def teacher_summary(tcfg, metrics: dict, data) -> dict:
    """What every teacher summary holds, from rank 0's final metrics (DESIGN's keys first)."""
    return {
        "arch": tcfg.arch,
        "params_total": int(metrics["params_total"]),
        "params_per_rank": [int(v) for v in metrics["params_per_rank"]],
        "zero_stage": tcfg.zero_stage,
        "world_size": tcfg.num_workers,
        "precision": tcfg.dtype_name,
        "steps": int(metrics["steps"]),
        "epochs": tcfg.epochs,
        "restarts": int(metrics["restarts"]),
        "resumes": int(metrics["resumes"]),
        "resumed_from_step": int(metrics["resumed_from_step"]),
        "accuracy": float(metrics["test_accuracy"]),
        "val_accuracy": float(metrics["val_accuracy"]),
        # The bar each accuracy must clear: always answering the split's most frequent class.
        "majority_accuracy": data.majority("test"),
        "majority_val_accuracy": data.majority("val"),
    }


def run_teacher(cfg: Config, data, out_dir: Path) -> dict:
    """Train the teacher on the cluster; write teacher.safetensors and return its summary."""
    import uuid

    tcfg = cfg.teacher
    spec = teacher_spec(cfg, data)
    check_teacher(cfg, spec, len(data.train))
    fit_id = uuid.uuid4().hex
    (out_dir / "ray").mkdir(parents=True, exist_ok=True)
    extra = {"fit_id": fit_id, "attempts_file": str((out_dir / "ray" / f"attempts-{fit_id}.log").resolve()),
             "tb_dir": str((out_dir / "tensorboard").resolve())}
    metrics, elapsed = train_on_ray(
        "teacher", teacher_worker, cfg, data, spec, out_dir, extra,
        max_failures=tcfg.max_failures, keep_checkpoints=tcfg.keep_checkpoints,
    )
    return {
        **teacher_summary(tcfg, metrics, data),
        **({"pretrained": str(tcfg.pretrained)} if tcfg.pretrained else {}),
        "export_check": metrics["export_check"],
        "samples_per_s": float(metrics["samples_per_s"]),
        # Rank 0's share of step time spent waiting for the next augmented batch (first batch apart).
        "data_wait_fraction": float(metrics["data_wait_fraction"]),
        "data_wait_ms_per_step": float(metrics["data_wait_ms_per_step"]),
        "data_first_batch_s": float(metrics["data_first_batch_s"]),
        "data_wait_fraction_with_start": float(metrics["data_wait_fraction_with_start"]),
        # [step, mean training loss of the epoch] per epoch this fit trained (a resume starts anew).
        "loss_curve": [[int(step), float(loss)] for step, loss in metrics["loss_curve"]],
        "lr": tcfg.lr,
        "weight_decay": tcfg.weight_decay,
        "train_time_s": round(elapsed, 2),
    }
