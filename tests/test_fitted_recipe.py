"""Defaults that fit the data (recipe.fit_to_data) and the quality gate (pipeline.quality_gate)."""

from __future__ import annotations

import pytest

from raydistill import recipe
from raydistill.config import DeployConfig, load_config
from raydistill.pipeline import QualityGateError, quality_gate


def test_unset_keys_fit_a_small_data_set():
    cfg = load_config(None, ["data.image_size=32"])
    fitted, chosen = recipe.fit_to_data(cfg, n_train=189, channels=3)
    t, s = fitted.teacher, fitted.student
    assert t.arch == "plain_cnn_m" and "32 px" in chosen["teacher.arch"]
    # batches small enough for 8 steps an epoch; epochs enough for MIN_STEPS optimizer steps
    assert 189 // (t.num_workers * t.batch_size) >= recipe.MIN_STEPS_PER_EPOCH or t.batch_size == 8
    assert t.epochs * (189 // (t.num_workers * t.batch_size)) >= recipe.MIN_STEPS
    assert s.epochs * (189 // (s.num_workers * s.batch_size)) >= recipe.STUDENT_MIN_STEPS > recipe.MIN_STEPS
    ops = [op.op for op in fitted.data.augment]
    assert ops == ["random_resized_crop", "affine", "color_jitter", "gaussian_noise"]  # no flip: it can change a class
    assert fitted.data.augment[1].degrees == 0  # nor rotation: a plus turned 25 degrees is nearly a cross
    assert set(chosen) == {"teacher.arch", "teacher.batch_size", "teacher.lr", "teacher.epochs", "student.batch_size",
                           "student.lr", "student.epochs", "data.augment"}
    defaults = load_config(None)
    assert t.lr == pytest.approx(defaults.teacher.lr * (t.batch_size / defaults.teacher.batch_size) ** 0.5)
    # a copy keeps the fitted values (they are set now) and re-derives what stays unset
    again = fitted.with_values({"seed": 1})
    assert (again.teacher.epochs, again.teacher.batch_size, again.teacher.arch) == (t.epochs, t.batch_size, t.arch)


def test_keys_the_config_sets_are_never_changed():
    cfg = load_config("configs/demo.yaml")
    fitted, chosen = recipe.fit_to_data(cfg, n_train=189, channels=1)
    assert chosen == {}
    assert fitted.model_dump() == cfg.model_dump()
    big = load_config(None, ["teacher.arch=resnet10t", "data.image_size=224"])
    fitted, chosen = recipe.fit_to_data(big, n_train=1_000_000, channels=3)
    assert fitted.teacher.epochs == big.teacher.epochs and fitted.teacher.batch_size == big.teacher.batch_size
    assert "teacher.arch" not in chosen and "strength 0.00" in chosen["data.augment"]


def test_the_teacher_stem_suits_the_image_size():
    assert load_config(None, ["data.image_size=32"]).teacher.arch == "plain_cnn_m"
    assert load_config(None, ["data.image_size=64"]).teacher.arch == "plain_cnn_l"
    assert load_config(None, ["data.image_size=224"]).teacher.arch == "resnet10t"
    assert recipe.augment_strength(500) == 1.0 and recipe.augment_strength(50_000) == 0.0
    assert 0 < recipe.augment_strength(5_000) < 1


def test_the_quality_gate_stops_a_model_no_better_than_guessing():
    dcfg = DeployConfig()
    poor = {"val_accuracy": 0.36, "majority_val_accuracy": 0.34}
    with pytest.raises(QualityGateError, match=r"teacher: validation accuracy 0.3600 does not beat the majority-class "
                                               r"baseline 0.3400 .* deploy.force=true"):
        quality_gate("teacher", poor, dcfg, deploying=True)
    quality_gate("teacher", poor, DeployConfig(force=True), deploying=True)  # forced: warns, goes on
    quality_gate("student", poor, dcfg, deploying=False)  # no deploy stage: warns only
    quality_gate("student", {"val_accuracy": 0.40, "majority_val_accuracy": 0.34}, dcfg, deploying=True)
