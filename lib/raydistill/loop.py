"""The training loop: every trainer in raydistill runs `fit`.

That is the teacher's Ray Train workers, the sweep's trials (in-process and on Ray Train), the
student's workers, the pruning fine-tune and the benchmarks. `fit` has two pluggable parts:

- an engine that owns the optimizer step: a DeepSpeed ZeRO 0-3 engine (sharding.wrap), or
  `TorchEngine` for a plain module or a DDP-wrapped one. TorchEngine keeps DeepSpeed's
  interface (engine(x), engine.backward(loss), engine.step() stepping the optimizer at
  accumulation boundaries, engine.lr_scheduler), so the loop needs no branch;
- a loss of (engine, batch): `CrossEntropy` (class ids, or soft labels from mixup / cutmix), or
  `Distillation` (KD at temperature T with the optional hint loss).

Every engine's LR follows `lr_schedule`, DeepSpeed's included (given to it as its client
scheduler), so a recipe means the same thing on every path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]
FLOOR = 0.01  # the LR starts warmup and ends a cosine decay at this share of its peak


@dataclass
class LRFactor:
    """The LR's share of its peak after `step` optimizer steps: linear warmup from FLOOR over
    `warmup` steps, then cosine decay to FLOOR, linear decay to 0, or constant; times `scale`
    (a parameter group's share, transfer.param_groups), and 0 for its first `frozen` steps.
    A callable object rather than a closure, so LambdaLR's state_dict (JSON in our
    checkpoints) keeps it."""

    kind: Schedule
    total: int
    warmup: int
    scale: float = 1.0
    frozen: int = 0

    def __call__(self, step: int) -> float:
        if step < self.frozen:
            return 0.0
        return self.scale * self._shape(step)

    def _shape(self, step: int) -> float:
        if step < self.warmup:
            return FLOOR + (1.0 - FLOOR) * step / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return FLOOR + (1.0 - FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, kind: Schedule, total_steps: int,
                warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """One LRFactor per parameter group, with the group's `lr_scale` and `frozen_steps`."""
    total, warmup = max(1, total_steps), int(total_steps * warmup_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        LRFactor(kind, total, warmup, group.get("lr_scale", 1.0), group.get("frozen_steps", 0))
        for group in optimizer.param_groups])


class TorchEngine:
    """AdamW on a plain or DDP-wrapped module, with DeepSpeed's engine interface: backward()
    scales the loss by 1/accum, step() counts micro-batches and at each accumulation boundary
    clips the global gradient norm (grad_clip > 0), steps the optimizer and the LR."""

    def __init__(self, module: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                 schedule: Schedule = "cosine", warmup_fraction: float = 0.0, grad_clip: float = 0.0,
                 accum: int = 1):
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        self.lr_scheduler = lr_schedule(self.optimizer, schedule, total_steps, warmup_fraction)
        self.grad_clip, self.accum, self.micro_steps = grad_clip, accum, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class CrossEntropy:
    """Cross-entropy of the logits (taken in fp32: a 16-bit engine autocasts its forward)
    against class ids (B,) or soft labels (B, classes)."""

    def __call__(self, engine, batch: dict) -> torch.Tensor:
        return F.cross_entropy(engine(batch["image"]).float(), batch["label"])


class Distillation:
    """The KD loss (kd.kd_loss) plus hint_weight x the hint loss. The teacher's logits come
    from `teacher` run on the very batch (online), or from the batch's `logits_column`
    (offline soft targets). The engine's module is a distill.Trainee: (x, teacher features)
    -> (logits, hint loss)."""

    def __init__(self, temperature: float, alpha: float, hint_weight: float = 0.0,
                 teacher: nn.Module | None = None, logits_column: str | None = None):
        if (teacher is None) == (logits_column is None):
            raise ValueError("Distillation needs either a teacher or a logits column")
        if hint_weight > 0 and teacher is None:
            raise ValueError("the hint loss needs the teacher's features: an online teacher")
        self.temperature, self.alpha, self.hint_weight = temperature, alpha, hint_weight
        self.teacher, self.logits_column = teacher, logits_column

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from raydistill.kd import features_and_logits

        with torch.no_grad():
            if self.hint_weight > 0:
                features, logits = features_and_logits(self.teacher, x)
                return logits, features
            return self.teacher(x), None

    def __call__(self, engine, batch: dict) -> torch.Tensor:
        from raydistill.kd import kd_loss

        x, y = batch["image"], batch["label"]
        if self.teacher is not None:
            teacher_logits, teacher_features = self.teacher_outputs(x)
        else:
            teacher_logits, teacher_features = batch[self.logits_column].float(), None
        logits, hint = engine(x, teacher_features)
        loss = kd_loss(logits.float(), teacher_logits.float(), y, self.temperature, self.alpha)
        return loss + self.hint_weight * hint if self.hint_weight > 0 else loss


def train_step(engine, loss: Callable, batch: dict) -> float:
    """One micro-step: forward, loss, backward; the engine steps the optimizer at
    accumulation boundaries. Returns the loss."""
    engine.train()
    value = loss(engine, batch)
    engine.backward(value)
    engine.step()
    return value.item()


def fit(engine, loss: Callable, micro_batches: Iterable[tuple[int, dict]], plan, after_step,
        wait=None) -> None:
    """Train over `micro_batches` ((micro-batch number from 1, batch dict)), stepping the
    optimizer every plan.accum of them. After each optimizer step calls
    after_step(step, the epoch's mean loss at an epoch's end (or the last step), else None).
    `wait` (training.DataWait), when given, times each step apart from the wait for data."""
    loss_sum, seen = 0.0, 0
    for micro, batch in micro_batches:
        value = wait.timed(train_step, engine, loss, batch) if wait is not None else train_step(engine, loss, batch)
        loss_sum, seen = loss_sum + value, seen + 1
        if micro % plan.accum:
            continue
        step = micro // plan.accum
        if step % plan.steps_per_epoch == 0 or step == plan.total_steps:
            after_step(step, loss_sum / seen)
            loss_sum, seen = 0.0, 0
        else:
            after_step(step, None)
