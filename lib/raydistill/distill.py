"""Distillation: a small student trained by Ray Train on the teacher's soft targets.

Online mode: each worker holds the (frozen) teacher and runs its forward pass on the very
augmented batch the student sees, so soft targets always match the student's views.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from raydistill.config import Config
from raydistill.training import EpochLog, StepPlan, set_threads, stream_batches, train_on_ray


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """(1 - alpha) * T^2 * KL(teacher_T || student_T) + alpha * CE(student, labels).

    T^2 keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.).
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean", log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return (1.0 - alpha) * (t * t) * soft + alpha * hard


def student_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import load as load_safetensors

    from raydistill.artifacts import save_weights
    from raydistill.models import ModelSpec, accuracy, build_network, recalibrate_batchnorm

    cfg = Config.model_validate(loop_config["cfg"])
    scfg = cfg.student
    spec = ModelSpec(**loop_config["spec"])
    teacher_spec = ModelSpec(**loop_config["teacher_spec"])
    plan = StepPlan(**loop_config["plan"])
    (val_images, val_labels), train_images = ray.get(loop_config["eval"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(scfg.cpus_per_worker)
    device = ray.train.torch.get_device()

    teacher = build_network(teacher_spec)
    teacher.load_state_dict(load_safetensors(ray.get(loop_config["teacher_weights"])))
    teacher.to(device).eval().requires_grad_(False)

    torch.manual_seed(cfg.seed)
    student = ray.train.torch.prepare_model(build_network(spec))  # DDP when world > 1
    plain = getattr(student, "module", student)
    opt = torch.optim.AdamW(student.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=scfg.lr, total_steps=plan.total_steps, pct_start=0.15)
    log = EpochLog("student", plan, scfg.batch_size * world, rank)
    shard = ray.train.get_dataset_shard("train")
    loss_sum, seen, step = 0.0, 0, 0
    for step, x, y in stream_batches(shard, scfg.batch_size, plan.total_steps, device):
        student.train()
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = kd_loss(student(x), teacher_logits, y, scfg.temperature, scfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum, seen = loss_sum + loss.item(), seen + 1
        if step % plan.steps_per_epoch == 0 or step == plan.total_steps:
            recalibrate_batchnorm(plain, train_images, spec.image_size)
            val_acc = accuracy(plain, val_images, val_labels, spec.image_size)
            metrics = {"loss": loss_sum / seen, "val_accuracy": val_acc}
            log.line(step, metrics)
            ray.train.report({**metrics, "epoch": step // plan.steps_per_epoch, "step": step})
            loss_sum, seen = 0.0, 0

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_weights(Path(tmp) / "student.safetensors", plain.state_dict(), spec.to_meta())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"steps": step, "samples_per_s": log.samples_per_s(max(step, 1))}, checkpoint=checkpoint)


def run_student(cfg: Config, data, teacher_path: Path, teacher_accuracy: float, out_dir: Path) -> dict:
    """Distill the teacher into the student; write student.safetensors and return its summary."""
    import ray

    from raydistill.artifacts import load_weights
    from raydistill.models import Classifier, ModelSpec, accuracy, build_network, count_params, latency_ms

    scfg = cfg.student
    teacher_state, teacher_meta = load_weights(teacher_path)
    teacher_spec = ModelSpec.from_meta(teacher_meta)
    spec = ModelSpec(scfg.arch, data.num_classes, data.input_shape, cfg.data.image_size)
    metrics, student, elapsed = train_on_ray(
        "student", student_worker, cfg, data, spec, out_dir,
        extra={"teacher_spec": teacher_spec.__dict__, "teacher_weights": ray.put(Path(teacher_path).read_bytes())},
    )
    teacher = build_network(teacher_spec)
    teacher.load_state_dict(teacher_state)
    acc = accuracy(student, data.test.images, data.test.labels, spec.image_size)
    student_latency = latency_ms(Classifier(student, spec), spec.input_shape)
    teacher_latency = latency_ms(Classifier(teacher, teacher_spec), teacher_spec.input_shape)
    return {
        "arch": scfg.arch,
        "params_total": count_params(student),
        "accuracy": acc,
        "teacher_accuracy": teacher_accuracy,
        "retention": acc / teacher_accuracy if teacher_accuracy else None,
        "params_ratio": count_params(teacher) / count_params(student),
        "latency_ms_p50": {"teacher": teacher_latency["p50"], "student": student_latency["p50"]},
        "latency_ms_p99": {"teacher": teacher_latency["p99"], "student": student_latency["p99"]},
        "kd": {"T": scfg.temperature, "alpha": scfg.alpha, "mode": "online"},
        "steps": int(metrics["steps"]),
        "epochs": scfg.epochs,
        "samples_per_s": float(metrics["samples_per_s"]),
        "train_time_s": round(elapsed, 2),
    }
