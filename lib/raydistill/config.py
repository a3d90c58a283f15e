"""One typed config per run: YAML preset + repeatable `--set key.path=value` overrides.

Unknown keys and bad values are refused before anything starts, with one line that names
the key and says what is allowed (the CLI turns `ConfigError` into exit code 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydistill.space import Dist


class ConfigError(ValueError):
    """A config that cannot run: the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Op(_Section):
    p: float = Field(1.0, ge=0, le=1, description="probability that a sample gets this op (drawn per sample)")


class RandomResizedCropOp(_Op):
    """Crop a random area fraction and aspect ratio, resized back to data.image_size."""

    op: Literal["random_resized_crop"]
    scale: tuple[float, float] = Field((0.85, 1.0), description="area fraction kept, [min, max] in (0, 1]")
    ratio: tuple[float, float] = Field((0.75, 4 / 3), description="aspect ratio range of the crop")

    @model_validator(mode="after")
    def _ranges(self) -> "RandomResizedCropOp":
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1 (got {list(self.scale)})")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max (got {list(self.ratio)})")
        return self


class FlipOp(_Op):
    """Mirror the image (not for data whose meaning changes when mirrored, such as digits)."""

    op: Literal["flip"]
    direction: Literal["horizontal", "vertical"] = "horizontal"
    p: float = Field(0.5, ge=0, le=1)


class RotationOp(_Op):
    op: Literal["rotation"]
    degrees: float = Field(12.0, ge=0, le=180, description="max rotation either way, degrees")


class AffineOp(_Op):
    """One random affine warp: rotation, shift and zoom together (one resampling)."""

    op: Literal["affine"]
    degrees: float = Field(0.0, ge=0, le=180, description="max rotation either way, degrees")
    translate: float = Field(0.1, ge=0, lt=0.5, description="max shift, fraction of the side")
    scale: tuple[float, float] = Field((0.9, 1.1), description="zoom range [min, max]")

    @model_validator(mode="after")
    def _ranges(self) -> "AffineOp":
        if not 0 < self.scale[0] <= self.scale[1] <= 2:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 2 (got {list(self.scale)})")
        return self


class ColorJitterOp(_Op):
    """Random brightness, contrast, saturation, hue (the last two are no-ops on grey images)."""

    op: Literal["color_jitter"]
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.05, ge=0, le=0.5)


class GaussianNoiseOp(_Op):
    op: Literal["gaussian_noise"]
    std: float = Field(0.05, ge=0, le=1, description="noise std on the 0..1 pixel scale")


class RandomErasingOp(_Op):
    """Blank a random rectangle (Zhong et al. 2017)."""

    op: Literal["random_erasing"]
    scale: tuple[float, float] = Field((0.02, 0.2), description="erased area fraction [min, max]")
    ratio: tuple[float, float] = Field((0.3, 3.3), description="aspect ratio range of the rectangle")
    p: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> "RandomErasingOp":
        if not 0 < self.scale[0] <= self.scale[1] < 1:
            raise ValueError(f"scale must satisfy 0 < min <= max < 1 (got {list(self.scale)})")
        return self


class RandAugmentOp(_Op):
    """RandAugment (Cubuk et al. 2020): n ops drawn from a fixed list, all at one magnitude."""

    op: Literal["rand_augment"]
    n: int = Field(2, ge=1, le=14, description="ops applied in sequence")
    magnitude: float = Field(9.0, gt=0, lt=30, description="strength of every op, on RandAugment's 0..30 scale")


class MixUpOp(_Op):
    """Blend each image with a random partner from its batch; labels blend alike (soft labels)."""

    op: Literal["mixup"]
    lambda_range: tuple[float, float] = Field(
        (0.0, 0.4), description="partner's weight, drawn uniformly per sample from [min, max] in [0, 1]")

    @model_validator(mode="after")
    def _ranges(self) -> "MixUpOp":
        if not 0 <= self.lambda_range[0] <= self.lambda_range[1] <= 1:
            raise ValueError(f"lambda_range must satisfy 0 <= min <= max <= 1 (got {list(self.lambda_range)})")
        return self


class CutMixOp(_Op):
    """Paste a random rectangle of a partner image; labels mix by the pasted area (soft labels)."""

    op: Literal["cutmix"]
    beta: float = Field(1.0, gt=0, description="Beta(beta, beta) draws the mixing coefficient")
    p: float = Field(0.5, ge=0, le=1)


class _TokenOp(_Op):
    rate: float = Field(0.1, ge=0, lt=1, description="share of a text's tokens the op touches")


class TokenMaskOp(_TokenOp):
    """Replace tokens with the tokenizer's [MASK] (text tasks)."""

    op: Literal["token_mask"]


class TokenDeleteOp(_TokenOp):
    """Drop tokens; the rest close up (text tasks)."""

    op: Literal["token_delete"]


class TokenSwapOp(_TokenOp):
    """Swap tokens with their right neighbour (text tasks)."""

    op: Literal["token_swap"]


TEXT_OPS = ("token_mask", "token_delete", "token_swap")
AugmentOp = Annotated[
    Union[RandomResizedCropOp, FlipOp, RotationOp, AffineOp, ColorJitterOp, GaussianNoiseOp,
          RandomErasingOp, RandAugmentOp, MixUpOp, CutMixOp, TokenMaskOp, TokenDeleteOp, TokenSwapOp],
    Field(discriminator="op"),
]
# op name -> its model: config keys `data.augment.<op>.<param>` address one op of the list.
AUGMENT_OPS: dict[str, type[_Op]] = {
    get_args(cls.model_fields["op"].annotation)[0]: cls
    for cls in get_args(get_args(AugmentOp)[0])
}
MIXING_OPS = ("mixup", "cutmix")


def _default_augment() -> list:
    return [RandomResizedCropOp(op="random_resized_crop"), AffineOp(op="affine", degrees=12.0),
            GaussianNoiseOp(op="gaussian_noise")]


class DataConfig(_Section):
    source: str = Field(
        "digits",
        description="Parquet file or folder (local path or pyarrow filesystem URI: s3://, gs://, file://), "
        "an image folder (one subfolder per class, PNG/JPEG; local path or URI), or `digits` (bundled)",
    )
    image_column: str = "image"
    label_column: str = "label"
    text_column: str = Field("text", description="text tasks: the column holding each row's text")
    text_pair_column: str | None = Field(
        None, description="text tasks: a second text per row (premise/hypothesis, query/document); "
        "the pair is encoded as one sequence, [CLS] text [SEP] pair [SEP]")
    question_column: str = Field("question", description="question_answering: the column holding the question")
    context_column: str = Field("context", description="question_answering: the column holding the context")
    answers_column: str = Field(
        "answers", description="question_answering: the column holding the answers, SQuAD's list of "
        "{text, answer_start} or Hugging Face datasets' {text: [...], answer_start: [...]}; empty: unanswerable")
    max_length: int = Field(128, ge=8, le=4096, description="text tasks: tokens per sequence; longer texts are cut "
                            "(question_answering: cut into windows)")
    doc_stride: int = Field(32, ge=1, description="question_answering: tokens shared by consecutive windows of a "
                            "context longer than a window")
    max_answer_tokens: int = Field(30, ge=1, description="question_answering: the longest answer span predicted")
    tokenizer: str | None = Field(
        None, description="text tasks: a Hugging Face tokenizer folder. Unset: the teacher's folder "
        "(teacher.arch hf:<dir>) when it holds one, else a WordPiece tokenizer trained on the training split")
    vocab_size: int = Field(8000, ge=100, le=250000, description="text tasks: size of a tokenizer trained here")
    unlabelled_source: str | None = Field(
        None, description="text_classification: texts without labels (Parquet, JSONL or CSV with "
        "data.text_column, local or a URI; `docstrings`: the bundled set's other first paragraphs). The "
        "student distils on them too, from the teacher's soft labels alone; a text that sits in the val or "
        "test split is dropped")
    on_bad_rows: Literal["fail", "skip"] = "fail"
    fingerprint: Literal["sample", "full"] = Field(
        "sample", description="how the data stage tells changed data at the same source: sample (every "
        "file's path, size and mtime, and the first and last 64 KiB of up to 256 files) or full (every byte)")
    image_size: int = Field(16, ge=8, le=1024, description="model input side, pixels")
    channels: Literal[0, 1, 3] = Field(
        0, description="channels the model sees: 1 (grey) or 3 (RGB); 0 keeps what the data holds "
        "(an image folder then reads RGB)")
    num_classes: int = Field(
        0, ge=0, description="classes; a label outside 0..num_classes-1 is a bad row. 0: the highest "
        "label + 1 (Parquet) or the number of class folders (image folder)")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    cpus_per_task: float = Field(
        0.25, gt=0, description="CPUs each augmentation task claims (fractions leave room for trainers)"
    )
    batch_size: int = Field(
        256, ge=1, description="rows augmented at once (vectorised; larger amortises kornia's per-call cost); "
        "the split is stored in blocks of this many rows, whose order is shuffled per epoch")
    prefetch_batches: int = Field(4, ge=0, description="batches each trainer keeps ready ahead of its step")
    augment: list[AugmentOp] = Field(
        default_factory=_default_augment,
        description="ordered list of ops, each {op: NAME, ...params}; ops: "
        "random_resized_crop, flip, rotation, affine, color_jitter, gaussian_noise, random_erasing, "
        "rand_augment, mixup, cutmix; for text tasks token_mask, token_delete, token_swap. "
        "Address one op's value as data.augment.<op>.<param>",
    )

    @model_validator(mode="after")
    def _one_of_each_op(self) -> "DataConfig":
        names = [op.op for op in self.augment]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.augment lists {', '.join(twice)} more than once; each op may appear once")
        return self

    def augment_spec(self) -> list[dict]:
        """The ordered ops as plain dicts: what Ray Data tasks receive (augment.augment_batch)."""
        return [op.model_dump(mode="json") for op in self.augment]

    @property
    def mixes_labels(self) -> bool:
        """Whether training labels are soft (B, classes) rather than class ids (B,)."""
        return any(op.op in MIXING_OPS for op in self.augment)


# What every sweep trial reports each epoch (in-process and Ray Train trials alike):
# validation accuracy and cross-entropy, and the training loss (mean over the epoch's steps, on
# augmented views: it says how well a trial fits, not how well it generalises).
TRIAL_METRICS = {"val_accuracy": "max", "loss": "min", "val_loss": "min"}


def _default_space() -> dict[str, Dist]:
    return {
        "teacher.lr": Dist(loguniform=(3e-4, 1e-2)),
        "teacher.weight_decay": Dist(loguniform=(1e-6, 1e-2)),
    }


class SweepConfig(_Section):
    """Bayesian search over any teacher or data setting, with early stopping (Ray Tune)."""

    num_trials: int = Field(4, ge=0, description="0 skips the sweep: the teacher trains with its own settings")
    searcher: Literal["tpe", "gp", "random"] = Field(
        "tpe", description="Optuna TPE (default), Optuna GP, or random search (the baseline)"
    )
    scheduler: Literal["asha", "hyperband", "fifo"] = Field(
        "asha", description="ASHA / HyperBand stop poor trials early; FIFO runs every trial to the end"
    )
    epochs: int = Field(2, ge=1, description="max epochs per trial (the schedulers' max_t)")
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped (ASHA)")
    reduction_factor: int = Field(2, ge=2, description="ASHA/HyperBand: keep the top 1/reduction_factor at each rung")
    metric: str = Field(
        "val_accuracy",
        description="what to optimise: val_accuracy, val_loss (validation cross-entropy: continuous, so it "
        "still ranks trials once accuracy saturates on a small validation split) or loss (training loss)",
    )
    mode: Literal["auto", "max", "min"] = Field("auto", description="auto: max for val_accuracy, min for the losses")
    startup_trials: int | None = Field(
        None, ge=1,
        description="tpe/gp: random trials before the model proposes; None: num_trials // 6, between 2 and 10",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="stop starting and running trials after this many seconds (None: no limit)"
    )
    trial_epoch_budget: int | None = Field(
        None, ge=1,
        description="stop the sweep once its trials have run this many epochs in total (None: no "
        "limit). An equal-compute budget: the epochs ASHA/HyperBand save by stopping trials early "
        "go to further trials, up to num_trials",
    )
    space: dict[str, Dist] = Field(
        default_factory=_default_space,
        description="dotted config key -> {uniform|loguniform|int|choice: ...} (see raydistill.space)",
    )
    trial_workers: int = Field(
        0, ge=0,
        description="0: each trial trains in its Tune actor (fast for small models); N: each trial is a "
        "Ray Train run of the teacher on N workers (teacher.cpus_per_worker each)",
    )
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs of an in-process trial (trial_workers=0)")
    max_concurrent_trials: int = Field(0, ge=0, description="0: as many as the cluster's CPUs fit")
    mlflow: bool = Field(True, description="log every trial (params, per-epoch metrics) to MLflow")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: a local file store in the run's sweep/mlflow"
    )

    @model_validator(mode="after")
    def _known_metric(self) -> "SweepConfig":
        if self.metric not in TRIAL_METRICS:
            raise ValueError(
                f"sweep.metric '{self.metric}' is never reported by the trials; they report: "
                f"{', '.join(TRIAL_METRICS)}"
            )
        if self.num_trials and not self.space:
            raise ValueError("sweep.space is empty: give at least one key to search over")
        return self

    @property
    def resolved_mode(self) -> str:
        return TRIAL_METRICS[self.metric] if self.mode == "auto" else self.mode

    @property
    def resolved_startup_trials(self) -> int:
        """Random trials before TPE/GP model the results. Optuna's default (10) suits budgets of
        hundreds; at the tens of trials a sweep of training runs affords it would spend a large
        share of the budget on random search. One in six, at least 2 (TPE needs a "good" and a
        "bad" group) and at most Optuna's 10."""
        if self.startup_trials is not None:
            return self.startup_trials
        return min(10, max(2, self.num_trials // 6))


class TeacherConfig(_Section):
    """The large model, trained with DeepSpeed ZeRO on Ray Train workers.

    The DeepSpeed JSON config is built from these keys (sharding.deepspeed_config); rules
    DeepSpeed would only enforce inside the workers are checked here, before any start.
    """

    arch: str = Field(
        "auto", description="timm model name, a small named plain CNN (plain_cnn_l ...), or auto: chosen "
        "from the image size (recipe.fit_to_data)")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="ZeRO-Offload of optimizer state (GPU runs, ZeRO stage >= 1)"
    )
    offload_param: Literal["none", "cpu", "nvme"] = Field(
        "none", description="ZeRO-Infinity offload of parameters (GPU runs, ZeRO stage 3)"
    )
    nvme_path: str | None = Field(None, description="local NVMe folder for offload = nvme")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in backward (timm's set_grad_checkpointing)"
    )
    init_from: str | None = Field(
        None, description="local safetensors file to initialise the teacher from (fine-tuning)"
    )
    pretrained: bool | str = Field(
        False, description="start from published weights, with a new classifier for the data's classes: "
        "true (the arch's default timm weights on the Hugging Face hub), a hub repository id (org/name) "
        "or a local directory holding model.safetensors. Read from the hub cache; downloaded only "
        "when the hub is reachable")
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="epochs in which only the classifier learns (the backbone's LR is 0), then all")
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1, description="the backbone's LR as a share of teacher.lr (the classifier's)")
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="layer-wise LR decay: each layer below the classifier learns at this "
        "share of the LR of the layer above; 1 turns it off")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker, per micro-step")
    global_batch_size: int | None = Field(
        None, ge=1,
        description="if set: batch_size x num_workers x grad_accum_steps must equal it "
        "(batch_size is derived when not given)",
    )
    grad_accum_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 turns clipping off")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="after warmup: cosine or linear decay, or constant"
    )
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="share of steps with linear LR warmup")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="save every rank's shard every N optimizer steps; 0: once per epoch"
    )
    keep_checkpoints: int = Field(2, ge=1, description="keep the latest K checkpoints")
    max_failures: int = Field(
        3, ge=-1, description="worker failures to recover from (restart from the latest checkpoint); -1: no limit"
    )

    @model_validator(mode="after")
    def _deepspeed_rules(self) -> "TeacherConfig":
        if self.pretrained not in (False, "") and self.init_from:
            raise ValueError("teacher.pretrained and teacher.init_from both name starting weights: give one")
        if self.freeze_backbone_epochs >= self.epochs:
            raise ValueError(f"teacher.freeze_backbone_epochs={self.freeze_backbone_epochs} leaves no epoch of "
                             f"teacher.epochs={self.epochs} to train the backbone")
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ValueError(f"teacher.precision={self.precision} needs teacher.use_gpu; CPU workers train in fp32")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) != "none" and not self.use_gpu:
                raise ValueError(f"teacher.{key} moves state off the GPU: it needs teacher.use_gpu")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("teacher.offload_param needs teacher.zero_stage=3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("teacher.offload_optimizer needs teacher.zero_stage >= 1")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("offload to nvme needs teacher.nvme_path")
        if self.global_batch_size is not None:
            per_step = self.num_workers * self.grad_accum_steps
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"teacher.global_batch_size={self.global_batch_size} does not divide into "
                    f"num_workers ({self.num_workers}) x grad_accum_steps ({self.grad_accum_steps})"
                )
            micro = self.global_batch_size // per_step
            if "batch_size" not in self.model_fields_set:
                object.__setattr__(self, "batch_size", micro)  # bypass validate_assignment recursion
            elif self.batch_size != micro:
                raise ValueError(
                    f"teacher.batch_size={self.batch_size} x num_workers x grad_accum_steps is "
                    f"{self.batch_size * per_step}, not teacher.global_batch_size={self.global_batch_size}"
                )
        return self

    @property
    def dtype_name(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision


class StudentConfig(_Section):
    """The small model: distilled from the teacher, then pruned, exported to ONNX and int8."""

    layers: int = Field(4, ge=1, le=48, description="text tasks: transformer layers of the student")
    hidden: int = Field(256, ge=8, le=8192, description="text tasks: hidden size of the student")
    heads: int = Field(4, ge=1, le=128, description="text tasks: attention heads (hidden must divide by it)")
    init: Literal["auto", "teacher_layers", "fresh"] = Field(
        "auto", description="text tasks: teacher_layers copies the embeddings and every k-th layer of the "
        "teacher (DistilBERT; needs the teacher's hidden size and heads); fresh starts from random "
        "weights; auto: teacher_layers when the sizes allow it")
    hidden_weight: float = Field(
        0.0, ge=0, description="text tasks: weight of the TinyBERT hidden-state loss (MSE through a learned "
        "projection, student layer i against teacher layer i*k); 0 turns it off")
    seed: int | None = Field(
        None, description="text tasks: the student's own seed (initialisation and batch order); unset: the "
        "run's seed. Splits and the teacher stay as they are, so students can be compared across seeds")
    attention_weight: float = Field(
        0.0, ge=0, description="text tasks: weight of the TinyBERT attention loss (MSE of attention "
        "probabilities, averaged over heads); 0 turns it off")
    arch: str = Field("test_efficientnet", description="timm model name (built with pretrained=False)")
    width: float = Field(
        1.0, gt=0, le=4, description="channel multiplier (timm channel_multiplier; efficientnet / mobilenetv3 families)"
    )
    depth: float = Field(
        1.0, gt=0, le=4, description="depth multiplier: block repeats per stage (timm depth_multiplier)"
    )
    teacher_mode: Literal["online", "offline"] = Field(
        "online",
        description="online: the teacher's forward runs in each student worker on the same batch; "
        "offline: Ray Data batch inference writes the teacher's logits beside the augmented views "
        "(Parquet in student/soft_targets/) first, for a teacher too large to sit beside the student",
    )
    offline_actors: int = Field(1, ge=1, description="offline: size of the teacher actor pool")
    offline_cpus_per_actor: float = Field(1.0, gt=0, description="offline: CPUs each teacher actor claims")
    offline_batch_size: int = Field(256, ge=1, description="offline: views per teacher forward pass")
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker")
    lr: float = Field(6e-3, gt=0, description="peak LR at batch_size (AdamW; small plain students take a high one)")
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="after warmup: cosine or linear decay, or constant (the teacher's schedules)"
    )
    warmup_fraction: float = Field(0.15, ge=0, lt=1, description="share of steps with linear LR warmup")
    grad_clip: float = Field(0.0, ge=0, description="max global gradient norm; 0 turns clipping off")
    temperature: float = Field(4.0, gt=0, description="KD softmax temperature T")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of hard-label CE; (1-alpha) on T^2*KL")
    hint_weight: float = Field(
        0.0, ge=0,
        description="weight of the hint loss (MSE of a learned 1x1 projection of the student's last "
        "feature map to the teacher's); 0 turns it off. Online mode only",
    )
    prune_ratio: float = Field(
        0.2, ge=0, lt=1,
        description="after distillation: share of channels removed per prunable layer (L2-norm ranked, "
        "physically removed); 0 skips pruning",
    )
    prune_finetune_epochs: int = Field(2, ge=0, description="short KD fine-tune after pruning, epochs")
    prune_finetune_lr: float = Field(2e-3, gt=0, description="peak LR of that fine-tune (cosine decay)")
    prune_max_drop: float = Field(
        0.01, ge=0, le=1,
        description="keep the pruned student only if its validation accuracy is at most this far below "
        "the unpruned one's",
    )
    kd_control: bool = Field(
        True, description="also train the same student on the labels alone (its recipe, alpha=1) and report "
        "whether distillation helped on validation (costs one more student training)")
    quantize: bool = Field(True, description="write student.int8.onnx (ONNX Runtime static int8, QDQ) for CPU serving")
    onnx_tolerance: float = Field(
        1e-4, gt=0, description="max |logit| difference allowed between ONNX Runtime and torch (fp32 export)"
    )

    @model_validator(mode="after")
    def _hint_needs_online(self) -> "StudentConfig":
        if self.hint_weight > 0 and self.teacher_mode == "offline":
            raise ValueError(
                "student.hint_weight needs student.teacher_mode=online (offline mode stores logits, not feature maps)"
            )
        return self


class DeployConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535)
    model_name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$")
    num_replicas: int = Field(1, ge=1, description="replicas when autoscaling is off")
    autoscale: bool = Field(False, description="let Serve scale between min_replicas and max_replicas")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="autoscaling target of in-flight requests per replica"
    )
    replica_cpus: float = Field(0.5, gt=0, description="CPUs per replica; torch or ONNX Runtime uses as many threads")
    use_gpu: bool = Field(False, description="one GPU per replica (runtime torch)")
    runtime: Literal["auto", "int8", "onnx", "torch"] = Field(
        "auto",
        description="what replicas run: int8, the student's static int8 ONNX (ONNX Runtime, CPU); onnx, its "
        "fp32 ONNX; torch, the PyTorch student (the one for GPUs); auto: on CPU int8 when the student stage "
        "wrote it (student.quantize) and it holds deploy.int8_max_drop on validation, else onnx; torch on GPU",
    )
    int8_max_drop: float = Field(
        0.01, ge=0, le=1,
        description="runtime auto serves int8 only if its validation accuracy is at most this much below the "
        "fp32 student's",
    )
    max_batch_size: int = Field(32, ge=1, description="@serve.batch: most requests per forward pass")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="@serve.batch: longest wait to fill a batch; 0 takes what queued during the last "
        "forward pass, so a lone request never waits",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; at least max_batch_size")
    max_request_images: int = Field(256, ge=1, description="most images one request may carry (413 past it)")
    max_batch_items: int = Field(
        256, ge=1, description="most images per forward pass: a batch of requests is cut into forwards of at "
        "most this many, so memory per forward is bounded whatever the requests carry",
    )
    max_request_bytes: int = Field(
        16 * 2**20, ge=1024,
        description="largest request body in bytes, counted as it streams in (chunked bodies and multipart "
        "uploads too); 413 past it",
    )
    max_image_pixels: int = Field(
        16 * 2**20, ge=1,
        description="largest uploaded image, width x height, read from its header before decoding (a "
        "decompression bomb is refused, 413)",
    )
    max_text_bytes: int = Field(16384, ge=1, description="text models: bytes one text may have (413 past it)")
    max_text_tokens: int = Field(
        512, ge=1, description="text models: tokens one text may encode to (400 past it); between the model's "
        "max_length and this, texts are cut to max_length as in training")
    max_json_depth: int = Field(32, ge=2, description="deepest JSON nesting a request may have (400 past it)")
    decode_threads: int = Field(
        2, ge=1, description="threads parsing request bodies and decoding uploaded images off the replica's "
        "event loop (bounds the memory decoding can take at once)",
    )
    api_key_env: str | None = Field(
        None, description="name of an env var holding an API key; requests then need 'Authorization: Bearer KEY'"
    )
    api_key_file: str | None = Field(None, description="file holding the API key (instead of api_key_env)")
    min_gain_over_majority: float = Field(
        0.05, ge=0, le=1,
        description="quality gate: the teacher's and the student's validation accuracy must beat the "
        "majority-class baseline (always answering the most frequent class) by this much, or the run stops "
        "before deploying")
    force: bool = Field(False, description="deploy even when the quality gate fails (the log still says so)")
    foreground: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: serve in the foreground until Ctrl-C only when this process started Ray",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "DeployConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                "deploy.max_ongoing_requests must be at least deploy.max_batch_size, "
                "or batches can never fill"
            )
        if self.autoscale and self.min_replicas > self.max_replicas:
            raise ValueError("deploy.min_replicas must not exceed deploy.max_replicas")
        if self.api_key_env and self.api_key_file:
            raise ValueError("set one of deploy.api_key_env and deploy.api_key_file, not both")
        if self.use_gpu and self.runtime in ("int8", "onnx"):
            raise ValueError(f"deploy.runtime={self.runtime} runs on CPU (ONNX Runtime); with deploy.use_gpu "
                             "set deploy.runtime to torch or auto")
        return self

    def peak_request_memory_bytes(self) -> int:
        """What in-flight requests may add to a replica's memory at most, by the limits:
        - each of max_ongoing_requests requests holds its body until it is parsed, then its
          input array (float32: at most 2 bytes per byte of JSON text, `0,`): 3x the body limit;
        - each decode thread parses one body at a time into Python objects of at most
          JSON_EXPANSION times its size, or decodes one uploaded image (RGB bytes, its converted
          copy and the float32 result of the resize: ~16 bytes a pixel);
        - one forward's input and activations, and allocator slack.
        Enforced by a test, with both kinds of requests."""
        from raydistill.inference_protocol import JSON_EXPANSION

        requests = self.max_ongoing_requests * self.max_request_bytes * 3
        decoding = self.decode_threads * max(self.max_request_bytes * JSON_EXPANSION, self.max_image_pixels * 16)
        return requests + decoding + 64 * 2**20

    def autoscaling_config(self) -> dict | None:
        if not self.autoscale:
            return None
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


# What each stage reads: a stage reruns when any of these sections changed.
STAGE_SECTIONS = {
    "data": ("seed", "task", "data"),
    "sweep": ("seed", "task", "data", "sweep", "teacher"),
    "teacher": ("seed", "task", "data", "teacher"),
    "student": ("seed", "task", "data", "student"),  # + the teacher's weights, an input checked by hash
    "deploy": ("deploy",),
}


class Config(_Section):
    seed: int = 0
    task: Literal["image_classification", "text_classification", "question_answering"] = Field(
        "image_classification", description="what the run learns: image_classification, "
        "text_classification or question_answering (extractive, SQuAD's); text tasks take a BERT-family "
        "teacher, teacher.arch hf:<dir>")
    data: DataConfig = DataConfig()
    sweep: SweepConfig = SweepConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    deploy: DeployConfig = DeployConfig()

    @property
    def is_text(self) -> bool:
        return self.task in ("text_classification", "question_answering")

    @property
    def is_qa(self) -> bool:
        return self.task == "question_answering"

    @model_validator(mode="after")
    def _ops_fit_the_task(self) -> "Config":
        """Token ops augment text and pixel ops images; each task refuses the other's. A text
        task that leaves data.augment unset trains on the texts as they are."""
        if self.is_text and "augment" not in self.data.model_fields_set:
            object.__setattr__(self, "data", self.data.model_copy(update={"augment": []}))
        wrong = [op.op for op in self.data.augment if (op.op in TEXT_OPS) != self.is_text]
        if wrong:
            allowed = ", ".join(TEXT_OPS) if self.is_text else "image ops only"
            raise ValueError(f"data.augment: {', '.join(wrong)} cannot augment a {self.task} run ({allowed})")
        if self.is_text and self.student.teacher_mode == "offline":
            raise ValueError("student.teacher_mode: a text student runs its teacher online")
        if self.is_text and self.student.hint_weight:
            raise ValueError("student.hint_weight: a text student transfers hidden states with student.hidden_weight")
        if self.is_qa and 2 * self.data.doc_stride >= self.data.max_length - 3:
            raise ValueError(f"data.doc_stride {self.data.doc_stride} must be under half of what a window leaves "
                             f"beside its question (data.max_length {self.data.max_length} - 3 special tokens)")
        moving = [op.op for op in self.data.augment if op.op in ("token_delete", "token_swap")]
        if self.is_qa and moving:
            raise ValueError(f"data.augment: {', '.join(moving)} would move the answer span's tokens; question "
                             "answering takes token_mask")
        if self.is_qa and self.data.text_pair_column:
            raise ValueError("data.text_pair_column: question answering pairs data.question_column with "
                             "data.context_column")
        if self.data.unlabelled_source and self.task != "text_classification":
            raise ValueError(f"data.unlabelled_source: unlabelled texts serve text_classification students, not "
                             f"{self.task}")
        if self.is_text and not self.teacher.arch.startswith("hf:"):
            raise ValueError(f"teacher.arch: a text task's teacher is a Hugging Face model, 'hf:<hub id or "
                             f"folder>', got {self.teacher.arch!r}")
        return self

    @model_validator(mode="after")
    def _resolve_auto_arch(self) -> "Config":
        """teacher.arch=auto -> the arch for data.image_size (recipe.teacher_arch). The key stays
        unset, so a copy (with_values) resolves it again from its own image size."""
        if self.teacher.arch == "auto" and not self.is_text:
            from raydistill.recipe import teacher_arch

            teacher = self.teacher.model_copy()  # never mutate a shared default section
            object.__setattr__(teacher, "arch", teacher_arch(self.data.image_size))
            object.__setattr__(self, "teacher", teacher)
        return self

    def digest(self, *sections: str) -> str:
        """Stable hash of the resolved config, or of some sections of it (a stage hashes only
        what it reads, so changing deploy.port does not retrain the teacher)."""
        tree = self.model_dump(mode="json")
        if sections:
            tree = {k: tree[k] for k in sections}
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def stage_digest(self, stage: str) -> str:
        return self.digest(*STAGE_SECTIONS[stage])

    def stage_config(self, stage: str) -> dict:
        """The resolved sections a stage reads (what its manifest record keeps)."""
        tree = self.model_dump(mode="json")
        return {k: tree[k] for k in STAGE_SECTIONS[stage]}

    def value_of(self, key: str) -> Any:
        """The value at a dotted key, as --set and sweep.space address it (data.augment.<op>.<param>
        names a value of the listed op)."""
        path = key.split(".")
        _section_for(path)
        node: Any = self
        for i, part in enumerate(path):
            if path[:2] == AUGMENT_PATH and i == 2:
                node = next((op for op in node if op.op == part), None)
                if node is None:
                    raise ConfigError(f"'{key}': data.augment has no '{part}' op")
                continue
            node = getattr(node, part)
        return node

    def with_values(self, values: dict[str, Any]) -> "Config":
        """A copy with dotted keys replaced (validated like --set). Keys left unset stay unset,
        so what is derived from them (recipe.fit_to_data, teacher.arch=auto) is derived again."""
        return _build(self.model_dump(mode="json", exclude_unset=True), [], values)


def _allowed(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


AUGMENT_PATH = ["data", "augment"]


def _augment_op_model(path: list[str]) -> type[BaseModel]:
    """`data.augment.<op>.<param>`: the model of that op (raises naming the allowed ops/params)."""
    if len(path) != 4:
        raise ConfigError(
            f"unknown key '{'.'.join(path)}': data.augment is an ordered list of ops; address one op's "
            f"value as data.augment.<op>.<param> (e.g. data.augment.rotation.degrees), or set the whole list"
        )
    model = AUGMENT_OPS.get(path[2])
    if model is None:
        raise ConfigError(f"unknown key '{'.'.join(path[:3])}': augment ops: {', '.join(AUGMENT_OPS)}")
    if path[3] not in model.model_fields or path[3] == "op":
        params = ", ".join(k for k in model.model_fields if k != "op")
        raise ConfigError(f"unknown key '{'.'.join(path)}': allowed here: {params}")
    return model


def _section_for(path: list[str]) -> type[BaseModel]:
    """The pydantic model that owns the last key of a dotted path (raises on unknown keys)."""
    if path[:2] == AUGMENT_PATH and len(path) > 2:
        return _augment_op_model(path)
    model: type[BaseModel] = Config
    for i, key in enumerate(path[:-1]):
        field = model.model_fields.get(key)
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            dotted = ".".join(path[: i + 1])
            raise ConfigError(f"unknown key '{dotted}': allowed here: {_allowed(model)}")
        model = sub
    if path[-1] not in model.model_fields:
        raise ConfigError(f"unknown key '{'.'.join(path)}': allowed here: {_allowed(model)}")
    return model


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    path = key.split(".")
    _section_for(path)
    if path[:2] == AUGMENT_PATH and len(path) == 4:
        _set_augment_param(tree, path, value)
        return
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{part}' is a section, not a value")
    node[path[-1]] = value


def _set_augment_param(tree: dict, path: list[str], value: Any) -> None:
    """Set one parameter of the op named path[2] in the data.augment list (it must be listed)."""
    data = tree.setdefault("data", {})
    if not isinstance(data, dict):
        raise ConfigError("'data' is a section, not a value")
    if "augment" not in data:
        data["augment"] = [op.model_dump(mode="json") for op in _default_augment()]
    ops = data["augment"]
    if not isinstance(ops, list):
        raise ConfigError("bad value for 'data.augment': expected a list of {op: NAME, ...} entries")
    matches = [op for op in ops if isinstance(op, dict) and op.get("op") == path[2]]
    if not matches:
        listed = ", ".join(str(op.get("op")) for op in ops if isinstance(op, dict)) or "none"
        raise ConfigError(
            f"'{'.'.join(path)}': data.augment has no '{path[2]}' op (listed: {listed}); add it to the list first"
        )
    matches[0][path[3]] = value


def _parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{item}': expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if isinstance(first.get("input"), dict):  # a cross-field rule: the message names the keys
        return f"bad values in '{loc}': {msg}" if loc else msg
    return f"bad value for '{loc}': {msg} (got {first.get('input')!r})"


def _check_keys(tree: Any, prefix: list[str]) -> None:
    """Refuse unknown keys with the list of allowed ones (pydantic alone would not list them)."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        path = [*prefix, str(key)]
        model = _section_for(path)
        sub = model.model_fields[str(key)].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"bad value for '{'.'.join(path)}': expected a section of {_allowed(sub)}")
            _check_keys(value, path)


def _build(tree: dict, sets: list[str], values: dict[str, Any] | None = None) -> Config:
    for item in sets:
        _set_dotted(tree, *_parse_set(item))
    for key, value in (values or {}).items():
        _set_dotted(tree, key, value)
    _check_keys(tree, [])
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, sets: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when path is None) and apply --set overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"--config {path}:{where} is not valid YAML") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    cfg = _build(tree, sets or [])
    if cfg.sweep.num_trials:
        check_space(cfg)
    return cfg


def check_space(cfg: "Config") -> None:
    """Every key a config value, every bound or choice a valid value for it (whether the
    trials read it is checked before Ray starts: sweep.check_swept_keys).

    Raises ConfigError naming the key. Called before Ray starts.
    """
    for key, dist in cfg.sweep.space.items():
        where = f"sweep.space.{key}"
        path = key.split(".")
        try:
            model = _section_for(path)
        except ConfigError as err:
            raise ConfigError(f"{where}: not a config key ({err})") from None
        field = model.model_fields[path[-1]].annotation
        if isinstance(field, type) and issubclass(field, BaseModel):
            raise ConfigError(f"{where}: '{key}' is a section; name one of its values, e.g. {key}.{next(iter(field.model_fields))}")
        for value in dist.values_to_check():
            try:
                cfg.with_values({key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: {dist.describe()} allows a value the config refuses: {err}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
