"""Teacher training: Ray Train TorchTrainer workers running a DeepSpeed ZeRO engine on
augmented views streamed from Ray Data.

Pieces shared with the student stage (the step plan, the stream loop, epoch logs, the
trainer factory) live here too.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raydistill.config import Config


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes: every worker must take exactly as many."""

    epochs: int
    steps_per_epoch: int

    @classmethod
    def of(cls, n_train: int, world_size: int, batch_size: int, epochs: int) -> "StepPlan":
        per_epoch = n_train // (world_size * batch_size)
        if per_epoch < 1:
            raise ValueError(
                f"{n_train} training rows cannot fill one batch of {batch_size} on each of "
                f"{world_size} workers: lower batch_size or num_workers"
            )
        return cls(epochs=epochs, steps_per_epoch=per_epoch)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def rows_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Rows one epoch streams: exactly the full batches all workers consume."""
        return self.steps_per_epoch * world_size * batch_size


def stream_batches(shard, batch_size: int, total_steps: int, device):
    """(step, images, labels) from a Ray Data shard, stopping at exactly total_steps."""
    step = 0
    batches = shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2)
    for batch in batches:
        if step >= total_steps:
            break
        step += 1
        yield step, batch["image"].to(device), batch["label"].to(device)


class EpochLog:
    """Per-epoch progress line on rank 0: loss, accuracy, samples/s, ETA."""

    def __init__(self, stage: str, plan: StepPlan, global_batch: int, rank: int):
        self.stage, self.plan, self.global_batch, self.rank = stage, plan, global_batch, rank
        self.start = time.perf_counter()

    def samples_per_s(self, step: int) -> float:
        return step * self.global_batch / max(1e-9, time.perf_counter() - self.start)

    def line(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        epoch = step // self.plan.steps_per_epoch
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.plan.total_steps - step)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        # Not print(): Train V2 patches it in workers to print *and* log, doubling each line.
        sys.stdout.write(
            f"[{self.stage}] epoch {epoch}/{self.plan.epochs} step {step}/{self.plan.total_steps} "
            f"{shown} samples/s {self.samples_per_s(step):.0f} eta {eta:.0f}s\n"
        )
        sys.stdout.flush()


def set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _trainer(loop, loop_config: dict, stage_cfg, datasets: dict, storage: Path, name: str):
    """A TorchTrainer (Train V2): gloo on CPU, NCCL on GPU."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if stage_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=stage_cfg.num_workers, use_gpu=stage_cfg.use_gpu,
            resources_per_worker={"CPU": stage_cfg.cpus_per_worker},
        ),
        datasets=datasets,
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )


def _fit(trainer, stage: str):
    """trainer.fit() with a clear error naming the stage when a worker fails."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        raise RuntimeError(f"{stage} training failed: {err}") from None
    if result.error is not None:
        raise RuntimeError(f"{stage} training failed: {result.error}")
    return result


def train_on_ray(stage: str, worker, cfg: Config, data, spec, out_dir: Path, extra: dict | None = None):
    """Run `worker` on Ray Train over the stage's stream of augmented views.

    The worker saves `<stage>.safetensors` into its final checkpoint; this copies it to
    out_dir and returns (final metrics of rank 0, the trained plain network, seconds).
    """
    import ray

    from raydistill.artifacts import load_weights
    from raydistill.data import train_stream
    from raydistill.models import build_network

    stage_cfg = getattr(cfg, stage)
    build_network(spec)  # fail fast on an unknown arch, before any worker starts
    plan = StepPlan.of(len(data.train), stage_cfg.num_workers, stage_cfg.batch_size, stage_cfg.epochs)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "spec": spec.__dict__, "plan": plan.__dict__,
        "eval": ray.put(((data.val.images, data.val.labels), data.train.images)), **(extra or {}),
    }
    stream = train_stream(cfg, data.train, stage_cfg.epochs,
                          plan.rows_per_epoch(stage_cfg.num_workers, stage_cfg.batch_size))
    trainer = _trainer(worker, loop_config, stage_cfg, {"train": stream}, out_dir / "ray", stage)
    start = time.perf_counter()
    result = _fit(trainer, stage)
    elapsed = time.perf_counter() - start
    path = _copy_from_checkpoint(result, f"{stage}.safetensors", out_dir / f"{stage}.safetensors")
    state, _ = load_weights(path)
    net = build_network(spec)
    net.load_state_dict(state)
    return result.metrics, net, elapsed


def _copy_from_checkpoint(result, filename: str, dest: Path) -> Path:
    import shutil

    if result.checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint holding {filename}")
    with result.checkpoint.as_directory() as ckpt:
        shutil.copyfile(Path(ckpt) / filename, dest)
    return dest


# ---- teacher --------------------------------------------------------------------------


def teacher_worker(loop_config: dict) -> None:
    """One Ray Train worker: ZeRO engine, streamed batches, per-epoch val accuracy."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from raydistill import sharding
    from raydistill.artifacts import save_weights
    from raydistill.models import ModelSpec, accuracy, build_network, recalibrate_batchnorm

    cfg = Config.model_validate(loop_config["cfg"])
    spec = ModelSpec(**loop_config["spec"])
    plan = StepPlan(**loop_config["plan"])
    (val_images, val_labels), train_images = ray.get(loop_config["eval"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(cfg.teacher.cpus_per_worker)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical init on every rank before ZeRO partitions it

    engine = sharding.wrap(build_network(spec), sharding.deepspeed_config(cfg.teacher, world, plan.total_steps))
    per_rank = sharding.gather_counts(sharding.local_param_count(engine))
    log = EpochLog("teacher", plan, cfg.teacher.batch_size * world, rank)
    shard = ray.train.get_dataset_shard("train")
    loss_sum, seen, step = 0.0, 0, 0
    dtype = torch.bfloat16 if cfg.teacher.use_gpu else torch.float32
    for step, x, y in stream_batches(shard, cfg.teacher.batch_size, plan.total_steps, device):
        engine.train()
        loss = F.cross_entropy(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        loss_sum, seen = loss_sum + loss.item(), seen + 1
        if step % plan.steps_per_epoch == 0 or step == plan.total_steps:
            # Every rank runs the same forwards here: ZeRO-3 gathers parameters collectively.
            adapter = _EvalAdapter(engine, dtype, device)
            recalibrate_batchnorm(engine.module, train_images, spec.image_size, forward=adapter)
            val_acc = accuracy(adapter, val_images, val_labels, spec.image_size)
            metrics = {"loss": loss_sum / seen, "val_accuracy": val_acc}
            log.line(step, metrics)
            ray.train.report({**metrics, "epoch": step // plan.steps_per_epoch, "step": step,
                              "samples_per_s": log.samples_per_s(step)})
            loss_sum, seen = 0.0, 0

    state = sharding.consolidated_state_dict(engine)
    final = {"steps": step, "samples_per_s": log.samples_per_s(max(step, 1)), "params_per_rank": per_rank,
             "params_total": sharding.full_param_count(engine)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_weights(Path(tmp) / "teacher.safetensors", state, spec.to_meta())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)


class _EvalAdapter:
    """Lets models.accuracy call a DeepSpeed engine like a plain module."""

    def __init__(self, engine, dtype, device):
        self.engine, self.dtype, self.device = engine, dtype, device

    def eval(self):
        self.engine.eval()

    def __call__(self, x):
        return self.engine(x.to(self.device, self.dtype)).float().cpu()


def run_teacher(cfg: Config, data, out_dir: Path) -> dict:
    """Train the teacher on the cluster; write teacher.safetensors and return its summary."""
    from raydistill.models import ModelSpec, accuracy

    tcfg = cfg.teacher
    spec = ModelSpec(tcfg.arch, data.num_classes, data.input_shape, cfg.data.image_size)
    metrics, net, elapsed = train_on_ray("teacher", teacher_worker, cfg, data, spec, out_dir)
    return {
        "arch": tcfg.arch,
        "params_total": int(metrics["params_total"]),
        "params_per_rank": [int(v) for v in metrics["params_per_rank"]],
        "zero_stage": tcfg.zero_stage,
        "world_size": tcfg.num_workers,
        "steps": int(metrics["steps"]),
        "epochs": tcfg.epochs,
        "restarts": 0,
        "accuracy": accuracy(net, data.test.images, data.test.labels, spec.image_size),
        "samples_per_s": float(metrics["samples_per_s"]),
        "lr": tcfg.lr,
        "weight_decay": tcfg.weight_decay,
        "train_time_s": round(elapsed, 2),
    }
