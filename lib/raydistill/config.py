"""One typed config per run: YAML preset + repeatable `--set key.path=value` overrides.

Unknown keys and bad values are refused before anything starts, with one line that names
the key and says what is allowed (the CLI turns `ConfigError` into exit code 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydistill.space import Dist


class ConfigError(ValueError):
    """A config that cannot run: the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Section):
    """Random augmentation applied by Ray Data to every training view, fresh each epoch."""

    rotation_deg: float = Field(12.0, ge=0, le=180, description="max rotation, degrees")
    shift: float = Field(0.1, ge=0, lt=0.5, description="max translation, fraction of size")
    scale_min: float = Field(0.9, gt=0, le=1, description="random zoom lower bound")
    scale_max: float = Field(1.1, ge=1, le=2, description="random zoom upper bound")
    crop_scale_min: float = Field(
        0.85, gt=0, le=1, description="random resized crop: min area fraction kept"
    )
    noise_std: float = Field(0.05, ge=0, le=1, description="gaussian pixel noise std (0..1 scale)")


class DataConfig(_Section):
    source: str = Field("digits", description="Parquet path/URI, or `digits` (bundled)")
    image_column: str = "image"
    label_column: str = "label"
    on_bad_rows: Literal["fail", "skip"] = "fail"
    image_size: int = Field(16, ge=8, le=1024, description="model input side, pixels")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    cpus_per_task: float = Field(
        0.25, gt=0, description="CPUs each augmentation task claims (fractions leave room for trainers)"
    )
    augment: AugmentConfig = AugmentConfig()


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

    arch: str = Field("resnet10t", description="timm model name (built with pretrained=False)")
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
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
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
    replica_cpus: float = Field(0.5, gt=0, description="CPUs per replica; torch uses as many threads")
    use_gpu: bool = Field(False, description="one GPU per replica")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch: most requests per forward pass")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="@serve.batch: longest wait to fill a batch; 0 takes what queued during the last "
        "forward pass, so a lone request never waits",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; at least max_batch_size")
    max_request_images: int = Field(256, ge=1, description="largest batch one request may carry")
    api_key_env: str | None = Field(
        None, description="name of an env var holding an API key; requests then need 'Authorization: Bearer KEY'"
    )
    api_key_file: str | None = Field(None, description="file holding the API key (instead of api_key_env)")
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
        return self

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
    "data": ("seed", "data"),
    "sweep": ("seed", "data", "sweep", "teacher"),
    "teacher": ("seed", "data", "teacher"),
    "student": ("seed", "data", "student"),  # + the teacher's weights, an input checked by hash
    "deploy": ("deploy",),
}


class Config(_Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    sweep: SweepConfig = SweepConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    deploy: DeployConfig = DeployConfig()

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

    def with_values(self, values: dict[str, Any]) -> "Config":
        """A copy with dotted keys replaced (validated like --set)."""
        return _build(self.model_dump(mode="json"), [], values)


def _allowed(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _section_for(path: list[str]) -> type[BaseModel]:
    """The pydantic model that owns the last key of a dotted path (raises on unknown keys)."""
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
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{part}' is a section, not a value")
    node[path[-1]] = value


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
        from raydistill.space import check_space

        check_space(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
