"""Defaults that fit the data: the recipe a run uses where its config leaves a key unset.

A fixed recipe suits one data set. Tuned to 1,797 digits, 5 epochs of 64-image batches are
about 60 optimizer steps; on a few hundred images of a user's own classes the same recipe
takes a dozen steps and serves a model no better than guessing. So, for each key the config
does not set, the data decides:

- teacher.arch: a network whose stem suits the image size (a plain CNN that halves the map
  once below 96 px, where an ImageNet stem would leave a 1x1 map by the last stage; the
  smaller plain_cnn_m below 48 px);
- batch sizes: no larger than gives every epoch MIN_STEPS_PER_EPOCH optimizer steps, and the
  learning rate scaled with the square root of the batch (the rule for Adam-type optimizers;
  the linear rule is SGD's);
- epochs: enough to reach MIN_STEPS optimizer steps for the teacher and STUDENT_MIN_STEPS for
  the student (at most MAX_EPOCHS): a student matching its teacher on augmented views learns
  slower than from labels and keeps gaining long after (Beyer et al. 2022, "Knowledge
  distillation: a good teacher is patient and consistent");
- data.augment: mild geometric and photometric ops whose strength grows as the data shrinks.

A key the config sets (in the YAML or with --set) is never changed. Every choice is logged
and recorded in the teacher's summary under `recipe`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raydistill.config import Config

MIN_STEPS = 800  # optimizer steps a from-scratch model needs to learn a small data set
STUDENT_MIN_STEPS = 2 * MIN_STEPS
MAX_EPOCHS = 200
MIN_STEPS_PER_EPOCH = 8
# Teachers by input side (below the first bound that exceeds it): plain CNNs whose stem halves
# the map once, then a timm ResNet whose ImageNet stem quarters it.
TEACHER_BY_SIZE = ((48, "plain_cnn_m"), (96, "plain_cnn_l"))
LARGE_INPUT_TEACHER = "resnet10t"


def teacher_arch(image_size: int) -> str:
    return next((arch for bound, arch in TEACHER_BY_SIZE if image_size < bound), LARGE_INPUT_TEACHER)


def batch_size(n_train: int, workers: int, configured: int) -> int:
    """The configured batch, halved (down to 8) until an epoch holds MIN_STEPS_PER_EPOCH steps."""
    size = configured
    while size > 8 and n_train // (workers * size) < MIN_STEPS_PER_EPOCH:
        size //= 2
    return size


def epochs(n_train: int, workers: int, batch: int, configured: int, steps: int = MIN_STEPS) -> int:
    """At least the configured epochs; more, up to MAX_EPOCHS, until `steps` optimizer steps."""
    per_epoch = max(1, n_train // (workers * batch))
    return max(configured, min(MAX_EPOCHS, math.ceil(steps / per_epoch)))


def augment_strength(n_train: int) -> float:
    """0 at 50,000 training images or more, 1 at 500 or fewer, log-linear between."""
    return min(1.0, max(0.0, math.log10(50_000 / max(n_train, 1)) / 2))


def augment_ops(n_train: int, channels: int) -> list[dict]:
    """Label-preserving ops for any image: no flip and no rotation, which change the class of
    whatever its orientation defines (a mirrored digit or letter, a plus turned towards a cross,
    stripes at another angle; list `flip` or give `affine` its `degrees` in data.augment when
    your classes keep), and mild even at full strength, since a few hundred optimizer steps
    must still fit the data."""
    s = augment_strength(n_train)
    ops = [
        {"op": "random_resized_crop", "scale": [round(0.9 - 0.15 * s, 3), 1.0]},
        {"op": "affine", "degrees": 0.0, "translate": round(0.03 + 0.05 * s, 3)},
    ]
    if channels == 3:
        ops.append({"op": "color_jitter", "brightness": round(0.1 + 0.1 * s, 3), "contrast": round(0.1 + 0.1 * s, 3),
                    "saturation": round(0.1 + 0.1 * s, 3)})
    ops.append({"op": "gaussian_noise", "std": round(0.01 + 0.02 * s, 3)})
    return ops


def fit_to_data(cfg: "Config", n_train: int, channels: int) -> tuple["Config", dict[str, str]]:
    """The config with every unset recipe key chosen for `n_train` training rows of
    `channels`-channel images; and {key: value and why} for each choice."""
    chosen: dict[str, tuple] = {}
    teacher, student = cfg.teacher, cfg.student
    if "arch" not in teacher.model_fields_set:
        chosen["teacher.arch"] = (teacher.arch, f"{cfg.data.image_size} px input")
    for name, section in (("teacher", teacher), ("student", student)):
        given = section.model_fields_set
        batch = section.batch_size
        if not {"batch_size", "global_batch_size"} & given:
            batch = batch_size(n_train, section.num_workers, section.batch_size)
            if batch != section.batch_size:
                chosen[f"{name}.batch_size"] = (batch, f"{MIN_STEPS_PER_EPOCH}+ steps per epoch on "
                                                       f"{n_train} rows and {section.num_workers} workers")
                if "lr" not in given:  # the default LR was set for the default batch; AdamW: square-root rule
                    lr = section.lr * math.sqrt(batch / section.batch_size)
                    chosen[f"{name}.lr"] = (lr, f"{section.lr:g} x sqrt({batch}/{section.batch_size}), "
                                                "scaled with the batch")
        if "epochs" not in given:
            accum = getattr(section, "grad_accum_steps", 1)
            steps = STUDENT_MIN_STEPS if name == "student" else MIN_STEPS
            value = epochs(n_train, section.num_workers * accum, batch, section.epochs, steps)
            if value != section.epochs:
                chosen[f"{name}.epochs"] = (value, f"{steps} optimizer steps")
    if "augment" not in cfg.data.model_fields_set:
        chosen["data.augment"] = (augment_ops(n_train, channels),
                                  f"strength {augment_strength(n_train):.2f} for {n_train} training rows")
    changed = {k: v for k, (v, _) in chosen.items() if k != "teacher.arch"}
    notes = {k: f"{_short(v)} ({why})" for k, (v, why) in chosen.items()}
    return (cfg.with_values(changed) if changed else cfg), notes


def _short(value) -> str:
    if isinstance(value, list):
        return ", ".join(op["op"] for op in value)
    return str(value)
