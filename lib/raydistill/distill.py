"""Distillation: a small student trained by Ray Train on the teacher's soft targets, then
compressed (pruning + short fine-tune, ONNX, int8) and reported.

Teacher modes (`student.teacher_mode`):
- online: each worker holds the frozen teacher and runs its forward pass on the very augmented
  batch the student sees, so soft targets always match the student's views;
- offline: Ray Data batch inference (an actor pool, GPUs when asked for) first writes the
  teacher's logits beside the augmented views as Parquet (student/soft_targets/); the workers
  then read (view, label, logits) rows and never hold the teacher.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from raydistill.config import Config
from raydistill.kd import build_trainee
from raydistill.training import EpochLog, StepPlan, stream_batches, worker_start

STUDENT_FILE, ONNX_FILE, INT8_FILE = "student.safetensors", "student.onnx", "student.int8.onnx"
MEASURE_FILE = "before_pruning.safetensors.measure"  # transient: only its size is reported
STAGING = ".next"  # an attempt's outputs, until they are all written


def student_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from raydistill.artifacts import load_weights, save_weights
    from raydistill.loop import Distillation, TorchEngine, fit
    from raydistill.models import build_network, load_network, recalibrate_batchnorm
    from raydistill.soft_targets import LOGITS_COLUMN
    from raydistill.training import validation_metrics

    cfg, spec, plan, data, bn_images, rank, world, device = worker_start(loop_config, "student")
    scfg = cfg.student
    view_shape = (spec.input_shape[0], spec.image_size, spec.image_size)

    teacher = None
    if scfg.teacher_mode == "online":
        # Read from the run's storage by each worker, hash-checked: the driver never loads it.
        state, meta = load_weights(Path(loop_config["teacher_path"]), loop_config["teacher_sha256"])
        teacher = load_network(state, meta).to(device).eval().requires_grad_(False)
    loss = Distillation(scfg.temperature, scfg.alpha, scfg.hint_weight, teacher=teacher,
                        logits_column=None if teacher is not None else LOGITS_COLUMN)

    torch.manual_seed(cfg.seed)
    trainee = build_trainee(build_network(spec), teacher, scfg.hint_weight, view_shape)
    engine = TorchEngine(ray.train.torch.prepare_model(trainee),  # DDP when world > 1
                         lr=scfg.lr, weight_decay=scfg.weight_decay, total_steps=plan.total_steps,
                         schedule=scfg.lr_schedule, warmup_fraction=scfg.warmup_fraction, grad_clip=scfg.grad_clip)
    plain = trainee.student
    log = EpochLog("student", plan, scfg.batch_size * world, rank)
    shard = ray.train.get_dataset_shard("train")
    last = {}

    def after_step(step: int, epoch_loss: float | None) -> None:
        if epoch_loss is None:
            return
        recalibrate_batchnorm(plain, bn_images, spec.image_size)
        val_accuracy = validation_metrics(plain, data, spec.image_size, rank, world)["val_accuracy"]
        last.update(loss=epoch_loss, val_accuracy=val_accuracy)  # the final report carries the last epoch's
        log.line(step, last)
        ray.train.report({**last, "epoch": step // plan.steps_per_epoch, "step": step})

    fit(engine, loss, stream_batches(shard, scfg.batch_size, plan.total_steps, device,
                                     prefetch_batches=cfg.data.prefetch_batches), plan, after_step)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_weights(Path(tmp) / STUDENT_FILE, plain.state_dict(), spec.to_meta())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**last, "steps": plan.total_steps, "samples_per_s": log.samples_per_s(plan.total_steps)},
                         checkpoint=checkpoint)


def student_spec(cfg: Config, data):
    from raydistill.models import ModelSpec

    s = cfg.student
    return ModelSpec(s.arch, data.num_classes, data.input_shape, cfg.data.image_size, width=s.width, depth=s.depth)


def run_student(cfg: Config, data, teacher_path: Path, teacher_accuracy: float, out_dir: Path,
                teacher_sha256: str | None = None) -> tuple[dict, list[Path]]:
    """Distill, compress, measure. Writes student.safetensors, student.onnx, student.int8.onnx,
    report.md/png (and soft_targets/ offline); returns (summary, files written).

    The driver only coordinates: distillation runs on Ray Train workers, and compression (the
    pruning fine-tune, ONNX export, int8 calibration, accuracies and latencies) in one Ray task
    holding `student.cpus_per_worker` CPUs (and a GPU with `student.use_gpu`)."""
    import ray

    from raydistill.artifacts import publish
    from raydistill.training import train_on_ray

    scfg = cfg.student
    spec = student_spec(cfg, data)
    files: list[Path] = []
    stream, extra = None, {"teacher_path": str(teacher_path.resolve()), "teacher_sha256": teacher_sha256}
    if scfg.teacher_mode == "offline":
        from raydistill.soft_targets import read_soft_targets, write_soft_targets

        plan = StepPlan.of(len(data.train), scfg.num_workers, scfg.batch_size, scfg.epochs)
        files += write_soft_targets(cfg, data, teacher_path, teacher_sha256,
                                    plan.rows_per_epoch(scfg.num_workers, scfg.batch_size), out_dir)
        stream = read_soft_targets(files)
    # The new student and its compressed forms are written to a staging folder and published
    # together at the end: a failed or interrupted attempt leaves the last good ones in place.
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    metrics, elapsed = train_on_ray("student", student_worker, cfg, data, spec, out_dir, extra, stream=stream,
                                    copy_to=staging)
    control = None
    if scfg.kd_control:  # the same student and recipe without the teacher: did KD help?
        (staging / "without_kd").mkdir(parents=True)
        labels_only = cfg.with_values({"student.alpha": 1.0, "student.hint_weight": 0.0})
        without, _ = train_on_ray("student", student_worker, labels_only, data, spec, out_dir, extra, stream=stream,
                                  copy_to=staging / "without_kd")
        control = float(without["val_accuracy"])
    task = ray.remote(_compress_in_task).options(num_cpus=scfg.cpus_per_worker, num_gpus=1 if scfg.use_gpu else 0,
                                                 max_retries=0)
    summary, compressed = ray.get(task.remote(cfg, data, spec, teacher_path, teacher_sha256, teacher_accuracy,
                                              staging, control))
    summary.update(steps=int(metrics["steps"]), epochs=scfg.epochs, samples_per_s=float(metrics["samples_per_s"]),
                   train_time_s=round(elapsed, 2))
    published = publish(staging, out_dir, compressed)
    shutil.rmtree(staging, ignore_errors=True)
    return summary, [*files, *published]


def _compress_in_task(cfg: Config, *args) -> tuple[dict, list[Path]]:
    """compress_student in its Ray task, with torch threads for the task's CPUs."""
    torch.set_num_threads(max(1, int(cfg.student.cpus_per_worker)))
    return compress_student(cfg, *args)


def compress_student(cfg: Config, data, spec, teacher_path: Path, teacher_sha256: str | None,
                     teacher_accuracy: float, out_dir: Path,
                     val_without_kd: float | None = None) -> tuple[dict, list[Path]]:
    """Prune (kept only if validation accuracy holds), save, export ONNX (checked against
    torch), quantize to int8, measure every form, write the report. Returns (summary, files).
    Runs as a Ray task: it reads the trained student and the teacher from the run's storage,
    and the splits a row group at a time. Latency is measured on one thread, as a replica with
    `deploy.replica_cpus` <= 1 runs."""
    import time

    from raydistill import compress, report
    from raydistill.artifacts import load_weights, save_weights
    from raydistill.evaluate import onnx_split_accuracy, split_metrics
    from raydistill.models import Classifier, ModelSpec, build_network, count_params, load_network

    scfg = cfg.student
    start = time.perf_counter()
    test, val = data.test, data.val
    teacher_state, teacher_meta = load_weights(teacher_path, teacher_sha256)
    teacher = load_network(teacher_state, teacher_meta).eval()
    del teacher_state
    student = build_network(spec)
    student.load_state_dict(load_weights(out_dir / STUDENT_FILE)[0])

    def accuracy(net, split) -> float:
        return split_metrics(net, split, spec.image_size)["accuracy"]

    distilled = {"params": count_params(student), "accuracy": accuracy(student, test),
                 "val_accuracy": accuracy(student, val)}
    final, pruning = student, {"status": "off (student.prune_ratio=0)", "ratio": 0.0}
    if scfg.prune_ratio > 0:
        pruned = compress.prune_channels(copy.deepcopy(student), scfg.prune_ratio, spec.image_size, spec.input_shape[0])
        compress.finetune(pruned, teacher, data.train, image_size=spec.image_size,
                          epochs=scfg.prune_finetune_epochs, batch_size=scfg.batch_size, lr=scfg.prune_finetune_lr,
                          temperature=scfg.temperature, alpha=scfg.alpha, seed=cfg.seed,
                          augment=cfg.data.augment_spec(), num_classes=data.num_classes,
                          device="cuda" if scfg.use_gpu and torch.cuda.is_available() else "cpu")
        val_pruned = accuracy(pruned, val)
        kept = val_pruned >= distilled["val_accuracy"] - scfg.prune_max_drop
        pruning = {"status": "kept" if kept else f"rejected (val accuracy fell more than {scfg.prune_max_drop})",
                   "ratio": scfg.prune_ratio, "params_before": distilled["params"], "params_after": count_params(pruned),
                   "val_accuracy_before": distilled["val_accuracy"], "val_accuracy_after": val_pruned,
                   "test_accuracy_after": accuracy(pruned, test),
                   "finetune_epochs": scfg.prune_finetune_epochs}
        final = pruned if kept else student
    meta = {**spec.to_meta(), "pruned": "true" if final is not student else "false"}
    weights = save_weights(out_dir / STUDENT_FILE, final.state_dict(), meta)
    onnx_path = compress.export_onnx(final, spec, out_dir / ONNX_FILE)
    onnx_check = compress.check_onnx(final, spec, onnx_path, test.head(256).images, scfg.onnx_tolerance)
    files = [weights, onnx_path]

    teacher_spec = ModelSpec.from_meta(teacher_meta)
    # Each form: (runner, test accuracy, params, its file on disk).
    forms = {"teacher": (report.torch_runner(Classifier(teacher, teacher_spec)), teacher_accuracy,
                         count_params(teacher), teacher_path)}
    if final is student:
        forms["student"] = (report.torch_runner(Classifier(student, spec)), distilled["accuracy"], distilled["params"], weights)
    else:
        forms["student (before pruning)"] = (report.torch_runner(Classifier(student, spec)), distilled["accuracy"],
                                             distilled["params"], _weights_file(student, spec, out_dir))
        forms["student"] = (report.torch_runner(Classifier(final, spec)), pruning["test_accuracy_after"],
                            count_params(final), weights)
    forms["student ONNX fp32"] = (report.onnx_runner(compress.onnx_session(onnx_path)),
                                  onnx_split_accuracy(onnx_path, test), count_params(final), onnx_path)
    if scfg.quantize:
        int8_path = compress.quantize_int8(onnx_path, out_dir / INT8_FILE, data.train.head(512).images)
        files.append(int8_path)
        forms["student int8 (ONNX)"] = (report.onnx_runner(compress.onnx_session(int8_path)),
                                        onnx_split_accuracy(int8_path, test),
                                        count_params(final), int8_path)
        # Validation figures let deploy.runtime=auto choose int8 without looking at the test split.
        int8_val = onnx_split_accuracy(int8_path, val)
    rows = {}
    with report.one_thread():
        for name, (fn, acc, params, path) in forms.items():
            rows[name] = {"accuracy": acc, "params": params, "file_bytes": Path(path).stat().st_size,
                          **report.profile(fn, spec.input_shape)}
    (out_dir / MEASURE_FILE).unlink(missing_ok=True)
    final_row = rows["student"]
    acc = final_row["accuracy"]
    summary = {
        "arch": scfg.arch,
        "width": scfg.width,
        "depth": scfg.depth,
        "params_total": count_params(final),
        "accuracy": acc,
        "teacher_accuracy": teacher_accuracy,
        "retention": acc / teacher_accuracy if teacher_accuracy else None,
        "params_ratio": count_params(teacher) / count_params(final),
        # DESIGN keys: teacher and student in torch; the exported forms beside them.
        "latency_ms_p50": {"teacher": rows["teacher"]["latency_ms_p50"], "student": final_row["latency_ms_p50"]},
        "latency_ms_p99": {"teacher": rows["teacher"]["latency_ms_p99"], "student": final_row["latency_ms_p99"]},
        "latency_ms_p50_exported": {
            "student_onnx": rows["student ONNX fp32"]["latency_ms_p50"],
            **({"student_int8": rows["student int8 (ONNX)"]["latency_ms_p50"]} if scfg.quantize else {})},
        "kd": {"T": scfg.temperature, "alpha": scfg.alpha, "mode": scfg.teacher_mode, "hint_weight": scfg.hint_weight},
        "kd_effect": kd_effect(distilled["val_accuracy"], val_without_kd),
        "majority_accuracy": data.majority("test"),
        "majority_val_accuracy": data.majority("val"),
        "teacher_arch": teacher_spec.arch,
        "distilled": distilled,
        "pruning": pruning,
        "onnx": onnx_check,
        "int8_accuracy": rows["student int8 (ONNX)"]["accuracy"] if scfg.quantize else None,
        "val_accuracy": pruning["val_accuracy_after"] if final is not student else distilled["val_accuracy"],
        "int8_val_accuracy": int8_val if scfg.quantize else None,
        "forms": rows,
        "compress_time_s": round(time.perf_counter() - start, 2),
    }
    files += report.write_report(out_dir, rows, summary)
    return summary, files


def kd_effect(with_kd: float, without_kd: float | None) -> dict:
    """Validation accuracy of the distilled student against the same student trained on the
    labels alone (student.kd_control), before pruning: whether distillation earned its cost."""
    if without_kd is None:
        return {"status": "not measured (student.kd_control=false)"}
    gain = with_kd - without_kd
    return {"val_accuracy_with_kd": with_kd, "val_accuracy_without_kd": without_kd, "gain": gain,
            "status": "helped" if gain > 0 else "did not help"}


def _weights_file(net: nn.Module, spec, out_dir: Path) -> Path:
    """The unpruned student as safetensors, only to measure its file size (deleted after)."""
    from raydistill.artifacts import save_weights

    path = out_dir / MEASURE_FILE
    if not path.exists():
        save_weights(path, net.state_dict(), spec.to_meta())
    return path
