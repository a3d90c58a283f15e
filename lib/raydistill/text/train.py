"""Training text models on Ray Train: the teacher sharded with DeepSpeed ZeRO, the student
distilled from it (KD on logits, optionally TinyBERT's hidden-state and attention transfer).

Both run the single training loop (loop.fit) over batches streamed from the stored token
splits by Ray Data, with the image teacher's checkpoints, resume and failure recovery
(training._restore, training._report). Each batch is trimmed to its longest row, and the
configured token ops (data.augment) are applied on the worker, seeded by step, so that a
resumed run sees the views it would have seen.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydistill.config import Config
from raydistill.training import StepPlan

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EVAL_BATCH = 64


def distills(scfg) -> bool:
    """Whether the student learns from its teacher at all (alpha=1 alone is plain fine-tuning)."""
    return bool(scfg.alpha < 1 or scfg.hidden_weight or scfg.attention_weight)


def training_splits(cfg: Config, data, role: str) -> tuple[str, ...]:
    """The stored splits a role trains on, in the order each epoch reads them. A distilling
    student also reads the unlabelled texts (data.unlabelled_source), where the teacher's soft
    labels are all it learns from: first, so that each epoch ends on the task's own texts and
    labels (TinyBERT's order: general distillation, then task distillation)."""
    from raydistill.text.data import UNLABELLED

    if role == "student" and distills(cfg.student) and getattr(data, "unlabelled", None):
        return (UNLABELLED, "train")
    return ("train",)


def _split_plans(cfg: Config, data, role: str) -> list[StepPlan]:
    section = getattr(cfg, role)
    return [StepPlan.of(data.rows(split), section.num_workers, section.batch_size, section.epochs,
                        getattr(section, "grad_accum_steps", 1)) for split in training_splits(cfg, data, role)]


def split_steps(cfg: Config, data, role: str) -> list[int]:
    """Micro-batches each training split gives every worker per epoch."""
    return [plan.steps_per_epoch * plan.accum for plan in _split_plans(cfg, data, role)]


def plan_of(cfg: Config, data, role: str) -> StepPlan:
    plans = _split_plans(cfg, data, role)
    return StepPlan(plans[0].epochs, sum(plan.steps_per_epoch for plan in plans), plans[0].accum)


def trim(batch: dict) -> dict:
    """Cut the padding every row of the batch shares: attention costs the square of the length."""
    length = max(1, int(batch["attention_mask"].sum(1).max()))
    return {k: (v[:, :length] if k in INPUTS else v) for k, v in batch.items()}


def augment_tokens(batch: dict, ops: list[dict], special_ids: torch.Tensor, mask_id: int, pad_id: int,
                   generator: torch.Generator) -> dict:
    """token_mask / token_delete / token_swap on the batch's ordinary tokens ([CLS], [SEP] and
    padding are never touched), each drawn per row (p) and per token (rate)."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"]
    for op in ops:
        ordinary = mask.bool() & ~torch.isin(ids, special_ids)
        row_on = torch.rand(ids.shape[0], 1, generator=generator) < op["p"]
        hit = ordinary & row_on & (torch.rand(ids.shape, generator=generator) < op["rate"])
        if op["op"] == "token_mask":
            ids = torch.where(hit, torch.full_like(ids, mask_id), ids)
        elif op["op"] == "token_swap":
            right = torch.roll(ordinary, -1, dims=1)
            swap = hit & right
            swap &= ~torch.roll(swap, 1, dims=1)  # a token swapped with its left neighbour stays put
            left_ids, right_ids = ids, torch.roll(ids, -1, dims=1)
            ids = torch.where(swap, right_ids, torch.where(torch.roll(swap, 1, dims=1), torch.roll(left_ids, 1, dims=1), ids))
        else:  # token_delete: keep the rest in order, pad the end
            keep = ~hit & (mask.bool() | (ids != pad_id))
            order = torch.argsort((~keep).int(), dim=1, stable=True)
            ids = torch.where(torch.gather(keep, 1, order), torch.gather(ids, 1, order), torch.full_like(ids, pad_id))
            kept = torch.gather(keep & mask.bool(), 1, order)
            mask = kept.to(batch["attention_mask"].dtype)
            batch = {**batch, "token_type_ids": torch.gather(batch["token_type_ids"], 1, order) * mask}
    return {**batch, "input_ids": ids, "attention_mask": mask}


def batches(shards: list, steps: list[int], batch_size: int, plan: StepPlan, device, seed: int, skip: int = 0,
            augment=None, wait=None):
    """(micro-batch number from 1, batch) over plan.epochs passes of the shards, one after the
    other (steps[i] micro-batches of shards[i] per epoch), each pass shuffled anew (seeded).
    A batch never mixes two shards: a student's labelled and unlabelled texts come in batches
    of their own (batches mixing them trained the text demo's student worse)."""
    per_epoch = plan.steps_per_epoch * plan.accum
    micro = 0
    for epoch in range(plan.epochs):
        if micro + per_epoch <= skip:  # a resumed run does not re-read finished epochs
            micro += per_epoch
            continue
        for shard, take in zip(shards, steps):
            stream = shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + epoch)
            if wait is not None:
                stream = wait.wrap(stream)
            for index, batch in enumerate(stream):
                if index >= take:  # drained, not left: a split stream starts the next epoch only
                    continue       # once every worker has read this one to its end
                micro += 1
                if micro <= skip:
                    continue
                batch = trim({k: v.long() for k, v in batch.items()})
                if augment is not None:
                    batch = augment(batch, micro)
                yield micro, {k: v.to(device) for k, v in batch.items()}


def logits_of(forward, arrays: dict, rows: slice) -> torch.Tensor:
    batch = trim({k: torch.from_numpy(arrays[k][rows]).long() for k in INPUTS})
    return forward(*(batch[k] for k in INPUTS)).float().cpu()


def _my_batches(n: int, rank: int, world: int):
    """(rows, counted) of the evaluation batches of a split of n rows, each rank taking every
    world-th batch. Every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively): a rank out of batches repeats its last one and does not count it."""
    starts = list(range(0, n, EVAL_BATCH))
    for r in range(-(-len(starts) // world)):
        i = r * world + rank
        start = starts[min(i, len(starts) - 1)]
        yield slice(start, start + EVAL_BATCH), i < len(starts)


def _sum_over_ranks(values: list[float], world: int) -> torch.Tensor:
    import torch.distributed as dist

    sums = torch.tensor(values, dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    return sums


class Classification:
    """Cross-entropy on class ids, KD on the class logits, accuracy."""

    targets = ("label",)

    def __init__(self, data):
        self.data, self.cache = data, {}

    def labels_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["label"])

    def kd(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict, t: float, alpha: float) -> torch.Tensor:
        from raydistill.kd import kd_loss

        return kd_loss(student.float(), teacher.float(), batch["label"], t, alpha)

    def arrays(self, split: str) -> dict:
        if split not in self.cache:
            self.cache[split] = self.data.arrays(split, self.columns)
        return self.cache[split]

    columns = (*INPUTS, "label")

    def score(self, logits: np.ndarray, split: str) -> dict:
        """The task's scores of a split's logits computed elsewhere (ONNX, int8)."""
        return {"accuracy": float((logits.argmax(1) == self.arrays(split)["label"]).mean())}

    def evaluate(self, forward, split: str, rank: int, world: int) -> dict:
        """Accuracy and mean cross-entropy on a split, sharded over the ranks."""
        arrays = self.arrays(split)
        correct = loss = rows = 0.0
        with torch.no_grad():
            for part, counted in _my_batches(len(arrays["label"]), rank, world):
                logits = logits_of(forward, arrays, part)
                labels = torch.from_numpy(arrays["label"][part]).long()
                if counted:
                    correct += (logits.argmax(1) == labels).sum().item()
                    loss += F.cross_entropy(logits, labels, reduction="sum").item()
                    rows += len(labels)
        correct, loss, rows = _sum_over_ranks([correct, loss, rows], world).tolist()
        return {"accuracy": correct / max(1.0, rows), "loss": loss / max(1.0, rows)}


class QuestionAnswering(Classification):
    """Cross-entropy on the answer's start and end tokens (padding masked out), KD on the
    start and end logits, and SQuAD's exact match and F1 of the decoded answers; `accuracy`
    is the F1, the score the sweep and the student's retention rank by."""

    targets = ("start_positions", "end_positions")

    def _masked(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        from raydistill.text.qa import mask_outside

        return mask_outside(logits.float(), batch["attention_mask"][:, : logits.shape[1]])

    def labels_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = self._masked(logits, batch)
        return sum(F.cross_entropy(logits[..., i], batch[k]) for i, k in enumerate(self.targets)) / 2

    def kd(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict, t: float, alpha: float) -> torch.Tensor:
        from raydistill.kd import kd_loss

        s, te = self._masked(student, batch), self._masked(teacher, batch)
        return sum(kd_loss(s[..., i], te[..., i], batch[k], t, alpha) for i, k in enumerate(self.targets)) / 2

    columns = (*INPUTS, "start_positions", "end_positions", "offset_start", "offset_end", "example")

    def _answers(self, spans: list, split: str) -> dict:
        from raydistill.text import qa

        if ("gold", split) not in self.cache:
            self.cache["gold", split] = self.data.gold(split)
        contexts, golds = self.cache["gold", split]
        answers = qa.best_answers(spans, contexts, self.data.allow_no_answer)
        scores = qa.squad_scores({k: v[0] for k, v in answers.items()}, golds)
        return {"accuracy": scores["f1"], "exact_match": scores["exact_match"], "f1": scores["f1"]}

    def _spans(self, logits: torch.Tensor, arrays: dict, rows: slice) -> list:
        from raydistill.text import qa

        masked = self._masked(logits, {"attention_mask": torch.from_numpy(arrays["attention_mask"][rows])})
        found = qa.window_spans(masked.numpy(), arrays["offset_start"][rows], arrays["offset_end"][rows],
                                self.data.max_answer_tokens)
        return list(zip(arrays["example"][rows].tolist(), found))

    def score(self, logits: np.ndarray, split: str) -> dict:
        arrays = self.arrays(split)
        return self._answers(self._spans(torch.from_numpy(logits), arrays, slice(None)), split)

    def evaluate(self, forward, split: str, rank: int, world: int) -> dict:
        """Windows sharded over the ranks, their best spans gathered, answers scored per example."""
        import torch.distributed as dist

        arrays = self.arrays(split)
        spans, loss, rows = [], 0.0, 0.0
        with torch.no_grad():
            for part, counted in _my_batches(len(arrays["example"]), rank, world):
                logits = logits_of(forward, arrays, part)
                if counted:
                    batch = {k: torch.from_numpy(arrays[k][part]).long() for k in ("attention_mask", *self.targets)}
                    loss += self.labels_loss(logits, batch).item() * len(logits)
                    rows += len(logits)
                    spans.extend(self._spans(logits, arrays, part))
        if world > 1 and dist.is_initialized():
            every = [None] * world
            dist.all_gather_object(every, spans)
            spans = [s for part in every for s in part]
        loss, rows = _sum_over_ranks([loss, rows], world).tolist()
        return {**self._answers(spans, split), "loss": loss / max(1.0, rows)}


def objective_of(data) -> Classification:
    return QuestionAnswering(data) if data.task == "question_answering" else Classification(data)


class _Forward:
    """An engine or module called with (input_ids, attention_mask, token_type_ids) -> logits."""

    def __init__(self, module, device):
        self.module, self.device = module, device

    def __call__(self, *inputs):
        return self.module(*(x.to(self.device) for x in inputs))


class LabelsOnly:
    """The task's loss on its targets (the teacher's loss, and the student without KD)."""

    def __init__(self, objective: Classification):
        self.objective = objective

    def __call__(self, engine, batch: dict) -> torch.Tensor:
        return self.objective.labels_loss(engine(*(batch[k] for k in INPUTS)), batch)


class TextDistillation(nn.Module):
    """The student being trained, and its loss: KD on logits (kd.kd_loss), plus TinyBERT's
    hidden-state loss (student layer i through a learned projection against teacher layer
    layer_map[i]) and attention loss (MSE of the attention probabilities, head-averaged)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, scfg, objective: Classification):
        super().__init__()
        from raydistill.text.models import layer_map

        self.student, self.teacher, self.objective = student, teacher, objective
        self.t, self.alpha = scfg.temperature, scfg.alpha
        self.hidden_weight, self.attention_weight = scfg.hidden_weight, scfg.attention_weight
        self.mapping = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        self.project = nn.Linear(student.config.hidden_size, teacher.config.hidden_size) if self.hidden_weight else None

    def train(self, mode: bool = True) -> "TextDistillation":
        """The student trains; the frozen teacher stays in eval mode (no dropout), so its soft
        labels are its answers, not a noisy draw of them."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, input_ids, attention_mask, token_type_ids, **targets):
        """Logits, or with the task's targets the training loss (through forward, so DDP syncs
        gradients)."""
        from raydistill.text.models import logits_of_output

        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if not targets:
            return logits_of_output(self.student(**inputs))
        return self.loss({**inputs, **targets})

    def loss(self, batch: dict) -> torch.Tensor:
        from raydistill.text.models import logits_of_output

        inputs = {k: batch[k] for k in INPUTS}
        deep = bool(self.hidden_weight or self.attention_weight)
        with torch.no_grad():
            t_out = self.teacher(**inputs, output_hidden_states=deep, output_attentions=deep)
        s_out = self.student(**inputs, output_hidden_states=deep, output_attentions=deep)
        loss = self.objective.kd(logits_of_output(s_out), logits_of_output(t_out), batch, self.t, self.alpha)
        keep = batch["attention_mask"].unsqueeze(-1).float()
        if self.hidden_weight:
            pairs = [(s_out.hidden_states[i + 1], t_out.hidden_states[j + 1]) for i, j in enumerate(self.mapping)]
            mse = sum(((self.project(s) - t) ** 2 * keep).sum() / (keep.sum() * t.shape[-1]) for s, t in pairs)
            loss = loss + self.hidden_weight * mse / len(pairs)
        if self.attention_weight:
            pairs = [(s_out.attentions[i].mean(1), t_out.attentions[j].mean(1)) for i, j in enumerate(self.mapping)]
            loss = loss + self.attention_weight * sum(F.mse_loss(s, t) for s, t in pairs) / len(pairs)
        return loss


class DistillLoss:
    def __init__(self, objective: Classification):
        self.targets = objective.targets

    def __call__(self, engine, batch: dict) -> torch.Tensor:
        return engine(*(batch[k] for k in INPUTS), **{k: batch[k] for k in self.targets})


def text_worker(loop_config: dict) -> None:
    """One Ray Train worker, for the teacher (role=teacher: DeepSpeed ZeRO engine) or the
    student (role=student: AdamW, DDP when world > 1, the frozen teacher beside it)."""
    import ray.train
    import ray.train.torch

    from raydistill import sharding
    from raydistill.artifacts import save_weights
    from raydistill.loop import fit
    from raydistill.text.data import load_tokenizer
    from raydistill.text.models import model_meta
    from raydistill.training import DataWait, EpochLog, _report, _restore, count_attempt, set_threads

    cfg = Config.model_validate(loop_config["cfg"])
    role, data = loop_config["role"], loop_config["data"]
    section = getattr(cfg, role)
    set_threads(section.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    plan = StepPlan(**loop_config["plan"])
    seed = cfg.seed if role == "teacher" or cfg.student.seed is None else cfg.student.seed
    tok = load_tokenizer(data.tokenizer_dir)
    objective = objective_of(data)
    build = _teacher_engine if role == "teacher" else _student_engine
    engine, loss, plain, forward, per_rank = build(cfg, loop_config, plan, len(tok), seed, world, device, objective)
    counters = {"fit_id": loop_config["fit_id"]}
    attempt = count_attempt(loop_config["attempts_file"]) if rank == 0 else 1
    log = EpochLog(role, plan, section.batch_size * getattr(section, "grad_accum_steps", 1) * world, rank,
                   tb_dir=loop_config.get("tb_dir"))
    start_step = _restore(engine, log, counters, attempt, rank, world) if role == "teacher" else 0
    log.start_step = start_step
    wait = DataWait()
    splits = loop_config.get("splits", ("train",))
    shards = [ray.train.get_dataset_shard(split) for split in splits]
    stream = batches(shards, loop_config.get("split_steps", [plan.steps_per_epoch * plan.accum]), section.batch_size,
                     plan, device, seed,
                     skip=start_step * plan.accum, augment=_token_ops(cfg, tok, seed, rank, world), wait=wait)
    shown, curve = {}, []
    every = getattr(section, "checkpoint_every_steps", 0)

    def after_step(step: int, epoch_loss: float | None) -> None:
        nonlocal shown
        save = role == "teacher" and step < plan.total_steps and (step % every == 0 if every else epoch_loss is not None)
        metrics = {"step": step, "epoch": -(-step // plan.steps_per_epoch)}
        if epoch_loss is not None:
            engine.eval()
            on_val = objective.evaluate(forward, "val", rank, world)
            shown = {"loss": epoch_loss, **{f"val_{k}": v for k, v in on_val.items()}}
            curve.append([step, epoch_loss])
            log.line(step, shown)
            metrics.update(shown)
        if save:
            _report(metrics, engine, step, counters)
        elif epoch_loss is not None:
            _report(metrics)

    fit(engine, loss, stream, plan, after_step, wait)
    engine.eval()
    on_test = {f"test_{k}": v for k, v in objective.evaluate(forward, "test", rank, world).items() if k != "loss"}
    if role == "teacher":
        full = sharding.consolidated_state_dict(engine)
        state = {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
        weights_of = engine.module.model
    else:
        state, weights_of = plain.state_dict(), plain

    def export(directory: Path) -> None:
        save_weights(directory / f"{role}.safetensors", state, model_meta(weights_of, role, data))

    final = {**shown, "epoch": plan.epochs, "steps": plan.total_steps, "samples_per_s": log.samples_per_s(plan.total_steps),
             "params_per_rank": per_rank, "params_total": sum(p.numel() for p in weights_of.parameters()) if role != "teacher"
             else sharding.full_param_count(engine), "restarts": counters.get("restarts", 0),
             "resumes": counters.get("resumes", 0), "resumed_from_step": start_step, **on_test,
             "loss_curve": curve, **wait.metrics()}
    if role == "teacher":
        _report(final, engine, plan.total_steps, counters, rank_files=export)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                export(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(final, checkpoint=checkpoint)


def worker_config(cfg: Config) -> dict:
    """The config as workers receive it. They do not share the driver's working directory, so
    a relative teacher folder is resolved here."""
    from raydistill.text.models import HF_PREFIX, hf_source

    tree = cfg.model_dump(mode="json")
    tree["teacher"]["arch"] = HF_PREFIX + hf_source(cfg.teacher.arch)
    return tree


# What changes only speed or bookkeeping, not what a teacher learns.
SPEED_KEYS = {"cpus_per_worker", "checkpoint_every_steps", "keep_checkpoints", "max_failures", "nvme_path"}


def trial_recipe(cfg: Config) -> tuple:
    """What a sweep trial of a text teacher trains from: its teacher settings and token ops.
    A swept key that leaves this unchanged changes nothing a trial measures (sweep.check_swept_keys)."""
    teacher = cfg.teacher.model_dump(mode="json", exclude=SPEED_KEYS)
    return json.dumps(teacher, sort_keys=True), json.dumps([op.model_dump(mode="json") for op in cfg.data.augment])


def trial_on_ray_train(params: dict, base: dict, data, storage: str) -> None:
    """One Tune trial: a Ray Train run of the text teacher on sweep.trial_workers workers,
    reporting val_accuracy, val_loss and loss every epoch to the scheduler."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig

    from raydistill.sweep import _timed_report_callback, trial_config
    from raydistill.training import fit_trainer, torch_trainer

    cfg = trial_config(Config.model_validate(base), params)
    fit_id = uuid.uuid4().hex
    Path(storage).mkdir(parents=True, exist_ok=True)
    loop_config = {"cfg": worker_config(cfg), "role": "teacher", "data": data, "plan": plan_of(cfg, data, "teacher").__dict__,
                   "fit_id": fit_id, "attempts_file": str(Path(storage) / f"attempts-{fit_id}.log")}
    run_config = RunConfig(name=f"trial-{tune.get_context().get_trial_id()}", storage_path=storage,
                           failure_config=FailureConfig(max_failures=0), callbacks=[_timed_report_callback()])
    trainer = torch_trainer(text_worker, loop_config, cfg.teacher,
                            {"train": data.dataset("train", cfg.data.cpus_per_task)}, run_config)
    fit_trainer(trainer, "sweep trial", release=False)  # beside other trials: the sweep releases


def _token_ops(cfg: Config, tok, seed: int, rank: int, world: int):
    """(batch, micro-batch number) -> the batch with data.augment's token ops applied, drawn
    from a generator seeded by step and rank; None without ops."""
    ops = [op.model_dump(mode="json") for op in cfg.data.augment]
    if not ops:
        return None
    special = torch.tensor(tok.all_special_ids)

    def augment(batch: dict, micro: int) -> dict:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + micro * world + rank)
        return augment_tokens(batch, ops, special, tok.mask_token_id, tok.pad_token_id, generator)

    return augment


def _teacher_engine(cfg: Config, loop_config: dict, plan: StepPlan, vocab: int, seed: int, world: int, device,
                    objective: Classification):
    """The teacher in its DeepSpeed ZeRO engine: (engine, loss, None, forward, params per rank)."""
    import functools

    from raydistill import sharding
    from raydistill.loop import lr_schedule
    from raydistill.text.models import TextLogits, build_teacher

    tcfg = cfg.teacher
    net = TextLogits(build_teacher(tcfg.arch, loop_config["data"].num_classes, vocab, tcfg.pretrained, seed,
                                   cfg.task))
    schedule = functools.partial(lr_schedule, total_steps=plan.total_steps, kind=tcfg.lr_schedule,
                                 warmup_fraction=tcfg.warmup_fraction)
    engine = sharding.wrap(net, sharding.deepspeed_config(tcfg, world), schedule)
    per_rank = sharding.gather_counts(sharding.local_param_count(engine))
    return engine, LabelsOnly(objective), None, _Forward(engine, device), per_rank


def _student_engine(cfg: Config, loop_config: dict, plan: StepPlan, vocab: int, seed: int, world: int, device,
                    objective: Classification):
    """The student (DDP when world > 1) beside its frozen teacher: (engine, loss, the plain
    student, forward, params per rank)."""
    import ray.train.torch

    from raydistill.loop import TorchEngine
    from raydistill.text.models import load_model

    scfg = cfg.student
    teacher = load_model(Path(loop_config["teacher_path"]), loop_config["teacher_sha256"]).to(device)
    teacher.requires_grad_(False)
    torch.manual_seed(seed)
    trainee = TextDistillation(loop_config["student_factory"](teacher), teacher, scfg, objective).to(device)
    engine = TorchEngine(ray.train.torch.prepare_model(trainee), lr=scfg.lr, weight_decay=scfg.weight_decay,
                         total_steps=plan.total_steps, schedule=scfg.lr_schedule,
                         warmup_fraction=scfg.warmup_fraction, grad_clip=scfg.grad_clip)
    per_rank = [sum(p.numel() for p in trainee.student.parameters())] * world
    loss = DistillLoss(objective) if distills(scfg) else LabelsOnly(objective)
    return engine, loss, trainee.student, _Forward(trainee, device), per_rank


def train_text(role: str, cfg: Config, data, out_dir: Path, extra: dict | None = None, copy_to: Path | None = None):
    """Run text_worker on Ray Train; the trained weights land in copy_to (default out_dir).
    Returns (rank 0's final metrics, seconds)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from raydistill.training import _copy_from_checkpoint, fit_trainer, torch_trainer

    section = getattr(cfg, role)
    plan = plan_of(cfg, data, role)
    fit_id = uuid.uuid4().hex
    ray_dir = (out_dir / "ray").resolve()
    ray_dir.mkdir(parents=True, exist_ok=True)
    splits = training_splits(cfg, data, role)
    loop_config = {"cfg": worker_config(cfg), "role": role, "data": data, "plan": plan.__dict__, "splits": splits,
                   "split_steps": split_steps(cfg, data, role),
                   "fit_id": fit_id, "attempts_file": str(ray_dir / f"attempts-{fit_id}.log"),
                   "tb_dir": str((out_dir / "tensorboard").resolve()), **(extra or {})}
    run_config = RunConfig(
        name=f"{role}-{cfg.stage_digest(role)}" + ("" if role == "teacher" else f"-{uuid.uuid4().hex[:6]}"),
        storage_path=str(ray_dir),
        failure_config=FailureConfig(max_failures=getattr(section, "max_failures", 0)),
        checkpoint_config=CheckpointConfig(num_to_keep=getattr(section, "keep_checkpoints", 1)),
    )
    datasets = {split: data.dataset(split, cfg.data.cpus_per_task) for split in splits}
    trainer = torch_trainer(text_worker, loop_config, section, datasets, run_config)
    start = time.perf_counter()
    result = fit_trainer(trainer, role)
    elapsed = time.perf_counter() - start
    _copy_from_checkpoint(result, f"{role}.safetensors", (copy_to or out_dir) / f"{role}.safetensors")
    return result.metrics, elapsed


def check_teacher(cfg: Config, data=None) -> dict:
    """What can be refused before a worker starts: the teacher folder (its config, and its
    weights when pretrained), the tokenizer against its embeddings, and the step plan."""
    from raydistill import sharding
    from raydistill.text.models import teacher_config

    config = teacher_config(cfg.teacher.arch)
    if data is not None:
        from raydistill.text.data import load_tokenizer

        vocab = len(load_tokenizer(data.tokenizer_dir))
        if cfg.teacher.pretrained and vocab > config.vocab_size:
            from raydistill.text.models import ModelError

            raise ModelError(f"teacher.arch {cfg.teacher.arch}: its embeddings hold {config.vocab_size} tokens but "
                             f"the tokenizer has {vocab}; use the model's own tokenizer (data.tokenizer)")
        if data.max_length > getattr(config, "max_position_embeddings", data.max_length):
            raise ValueError(f"data.max_length {data.max_length} exceeds the teacher's "
                             f"{config.max_position_embeddings} positions")
        plan_of(cfg, data, "teacher")
    sharding.validate(sharding.deepspeed_config(cfg.teacher, cfg.teacher.num_workers))
    return {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers}


def run_teacher(cfg: Config, data, out_dir: Path) -> dict:
    """Train the text teacher on the cluster; write teacher.safetensors and return its summary."""
    from raydistill.training import teacher_summary

    tcfg = cfg.teacher
    check_teacher(cfg, data)
    metrics, elapsed = train_text("teacher", cfg, data, out_dir)
    return {
        "task": cfg.task,
        **teacher_summary(tcfg, metrics, data),
        **{k: float(v) for k, v in metrics.items() if k.endswith(("_exact_match", "_f1"))},
        "pretrained": bool(tcfg.pretrained),
        "samples_per_s": float(metrics["samples_per_s"]),
        "data_wait_fraction": float(metrics["data_wait_fraction"]),
        "loss_curve": [[int(s), float(v)] for s, v in metrics["loss_curve"]],
        "lr": tcfg.lr,
        "train_time_s": round(elapsed, 2),
    }


class StudentFactory:
    """teacher -> a new student model (picklable: it is sent to the workers)."""

    def __init__(self, layers: int, hidden: int, heads: int, init: str):
        self.layers, self.hidden, self.heads, self.init = layers, hidden, heads, init

    @classmethod
    def of(cls, scfg) -> "StudentFactory":
        return cls(scfg.layers, scfg.hidden, scfg.heads, scfg.init)

    def plan(self, teacher_cfg) -> str:
        """teacher_layers or fresh, `auto` resolved."""
        from raydistill.text.models import ModelError, can_copy_layers, student_config

        fits = can_copy_layers(teacher_cfg, student_config(teacher_cfg, self.layers, self.hidden, self.heads))
        if self.init == "teacher_layers" and not fits:
            raise ModelError("student.init=teacher_layers needs the teacher's hidden size, heads and at most its "
                             f"{teacher_cfg.num_hidden_layers} layers (student.hidden={self.hidden}, "
                             f"heads={self.heads}, layers={self.layers})")
        return "teacher_layers" if self.init == "teacher_layers" or (self.init == "auto" and fits) else "fresh"

    def __call__(self, teacher: nn.Module) -> nn.Module:
        from raydistill.text.models import init_from_teacher, student_config

        config = student_config(teacher.config, self.layers, self.hidden, self.heads)
        student = type(teacher)(config)  # the teacher's task head (classification or QA), narrowed
        if self.plan(teacher.config) == "teacher_layers":
            init_from_teacher(student, teacher)
        return student
