"""The student stage's offline mode on a real local Ray: a Ray Data actor pool writes the
teacher's soft targets as Parquet first, on exactly the views the online mode streams; then a
rerun that fails after training leaves that student usable. The
online mode (teacher inside the Ray Train loop), compression, the DESIGN summary keys and
hash-checked artifacts run in the pipeline job of test_e2e_job.py."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raydistill import pipeline
from raydistill.artifacts import Run, load_weights, save_weights, sha256, write_json
from raydistill.config import load_config
from raydistill.models import ModelSpec, build_network, load_network, recalibrate_batchnorm

from conftest import REPO

QUICK = ["student.epochs=1", "student.num_workers=1", "student.cpus_per_worker=1", "student.prune_ratio=0",
         "student.quantize=false", "sweep.num_trials=0"]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _with_teacher(tmp_path, name: str, digits_parquet) -> Run:
    """A run whose teacher stage is done: a small timm teacher recorded as the pipeline would
    (weights + summary, sha256 in manifest.json). Its quality does not matter here."""
    from raydistill.data import sample_rows

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.source={digits_parquet}"])
    images, _, _ = sample_rows(cfg, str(digits_parquet), 512)
    spec = ModelSpec("resnet10t", 10, images.shape[1:], cfg.data.image_size)
    torch.manual_seed(0)
    net = build_network(spec)
    recalibrate_batchnorm(net, images, spec.image_size)
    run = Run(tmp_path, name)
    with run.stage("teacher", cfg.stage_digest("teacher")) as outputs:
        outputs.append(save_weights(run.dir("teacher") / "teacher.safetensors", net.state_dict(), spec.to_meta()))
        outputs.append(write_json(run.dir("teacher") / "summary.json", {"accuracy": 0.5}))
    return run


def test_offline_student_trains_on_stored_soft_targets_and_a_failed_rerun_keeps_it(tmp_path, ray_session,
                                                                                      digits_parquet):
    from raydistill.augment import train_stream
    from raydistill.data import Dataset
    from raydistill.distill import STAGING
    from raydistill.training import StepPlan

    run = _with_teacher(tmp_path, "offline", digits_parquet)
    # With mixup the stored labels are soft, and the KD loss's hard-label term takes them as they are.
    mixup = ("data.augment=[{op: random_resized_crop, scale: [0.85, 1.0]}, {op: affine, degrees: 12}, "
             "{op: mixup, lambda_range: [0.1, 0.4]}]")
    sets = [*QUICK, f"data.source={digits_parquet}", "student.teacher_mode=offline",
            "student.offline_cpus_per_actor=0.5", mixup]
    cfg = load_config(REPO / "configs" / "demo.yaml", sets)
    summary = pipeline.run_stages(cfg, str(tmp_path), "offline", ("student",))["student"]
    assert summary["kd"]["mode"] == "offline" and summary["int8_accuracy"] is None
    assert summary["int8_val_accuracy"] is None and 0 < summary["val_accuracy"] <= 1  # deploy's auto reads these
    assert summary["pruning"]["status"].startswith("off")

    files = sorted((run.root / "student" / "soft_targets").glob("*.parquet"))
    assert files
    outputs = run.manifest()["stages"]["student"]["outputs"]
    assert all(outputs[f"student/soft_targets/{f.name}"] == sha256(f) for f in files)
    table = pq.read_table(files).to_pandas() if len(files) == 1 else \
        __import__("pandas").concat([pq.read_table(f).to_pandas() for f in files])
    data = Dataset.load(run.root / "data" / "splits")
    plan = StepPlan.of(len(data.train), 1, cfg.student.batch_size, cfg.student.epochs)
    assert len(table) == plan.epochs * plan.rows_per_epoch(1, cfg.student.batch_size)

    views = np.stack([np.asarray(v, dtype=np.float32).reshape(1, 16, 16) for v in table["image"]])
    soft = np.stack([np.asarray(v, dtype=np.float32) for v in table["label"]])
    assert soft.shape == (len(table), 10) and np.allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    assert (soft.max(axis=1) < 0.95).mean() > 0.5  # mixed, not one-hot
    logits = np.stack([np.asarray(v, dtype=np.float32) for v in table["teacher_logits"]])
    # The stored logits are the teacher's on exactly the stored views...
    state, meta = load_weights(run.root / "teacher" / "teacher.safetensors")
    teacher = load_network(state, meta).eval()
    with torch.no_grad():
        expected = teacher(torch.from_numpy(views)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    # ...and the stored views are the ones the online mode streams (same seeds, same rows).
    online = train_stream(cfg, data.train, cfg.student.epochs, plan.rows_per_epoch(1, cfg.student.batch_size),
                          num_classes=data.num_classes)
    online_views = np.concatenate([b["image"] for b in online.iter_batches(batch_size=256, batch_format="numpy")])

    def digest(a):
        return hashlib.sha256(np.round(a, 4).tobytes()).hexdigest()

    assert {digest(v) for v in views} == {digest(v) for v in online_views}
    assert json.loads((run.root / "student" / "summary.json").read_text())["accuracy"] == summary["accuracy"]

    # A new attempt writes its student and compressed forms aside and publishes them only when
    # all are written: one that fails on the way (here its staging folder cannot be made, as on
    # a full or read-only disk) leaves the last good files, which deploy checks by hash, usable.
    student = run.root / "student"
    good = {name: sha256(student / name) for name in ("student.safetensors", "student.onnx", "report.md")}
    assert not (student / STAGING).exists()
    (student / STAGING).write_text("in the way")
    with pytest.raises(Exception, match=STAGING):
        pipeline.run_stages(load_config(REPO / "configs" / "demo.yaml", [*sets, "student.teacher_mode=online"]),
                            str(tmp_path), "offline", ("student",))
    record = run.manifest()["stages"]["student"]
    assert record["status"] == "failed" and record["last_good"]
    assert {name: sha256(student / name) for name in good} == good
    assert pipeline._verify(run, "student", student / "student.safetensors") == good["student.safetensors"]

