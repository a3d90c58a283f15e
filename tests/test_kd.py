"""The distillation losses, checked against hand computations and their limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydistill.config import ConfigError, load_config
from raydistill.kd import HintProjection, Trainee, build_trainee, hint_loss, kd_loss
from raydistill.loop import Distillation, TorchEngine, train_step
from raydistill.models import ModelSpec, build_network


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_a_hand_computation():
    s, t = [1.0, 0.0, -1.0], [3.0, 1.0, 0.0]
    temp, alpha = 2.0, 0.3
    soft = _kl(_softmax(t, temp), _softmax(s, temp))  # KL(teacher || student) at T
    hard = -math.log(_softmax(s, 1.0)[2])  # label 2
    expected = (1 - alpha) * temp**2 * soft + alpha * hard
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([2]), temp, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_rows_without_a_label_learn_from_the_soft_term_alone():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    labels = torch.tensor([2, -1, 0, -1])  # -1: an unlabelled text
    soft = kd_loss(s, t, labels.clamp(min=0), 2.0, 0.0)  # T^2 * KL over every row
    hard = F.cross_entropy(s[[0, 2]], labels[[0, 2]])  # the labelled rows only
    assert kd_loss(s, t, labels, 2.0, 0.3).item() == pytest.approx((0.7 * soft + 0.3 * hard).item(), rel=1e-6)
    unlabelled = kd_loss(s, t, torch.full((4,), -1), 2.0, 0.3)
    assert unlabelled.item() == pytest.approx(0.7 * soft.item(), rel=1e-6)
    unlabelled.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_kd_loss_limits():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(kd_loss(s, t, y, 4.0, 1.0), F.cross_entropy(s, y))  # alpha=1: pure CE
    assert kd_loss(t, t, y, 4.0, 0.0).abs() < 1e-6  # matching the teacher costs nothing
    # alpha=0 is T^2 x batch-mean KL of the tempered distributions
    kl = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="sum") / 8
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), 16 * kl, rtol=1e-5)


def test_t_squared_keeps_soft_gradients_on_scale():
    """Without T^2 the soft-target gradient would shrink ~1/T^2; with it, it tends to a constant
    (the logit-matching limit (z_s - z_t) / N for zero-mean logits)."""
    torch.manual_seed(1)
    t = torch.randn(4, 10)
    t = t - t.mean(-1, keepdim=True)
    s0 = torch.randn(4, 10)
    s0 = s0 - s0.mean(-1, keepdim=True)
    norms = {}
    for temp in (10.0, 100.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, torch.zeros(4, dtype=torch.long), temp, 0.0).backward()
        norms[temp] = s.grad.norm().item()
        limit = ((s0 - t) / 10 / 4).norm().item()  # (z_s - z_t) / (classes * batch)
        assert s.grad.norm().item() == pytest.approx(limit, rel=0.05 if temp == 10 else 0.005)
    assert norms[100.0] == pytest.approx(norms[10.0], rel=0.05)


def test_kd_gradient_pulls_student_towards_teacher():
    t = torch.tensor([[4.0, 0.0, 0.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    kd_loss(s, t, torch.tensor([0]), 2.0, 0.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]


def test_hint_loss_is_mse_after_projection_and_pooling():
    hint = HintProjection(4, 6)
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)
    expected = F.mse_loss(F.adaptive_avg_pool2d(hint.proj(s), 2), t)
    assert torch.allclose(hint(s, t), expected)
    assert hint_loss(t, t).item() == 0.0
    # a smaller student map is upsampled to the teacher's
    assert hint_loss(torch.randn(2, 6, 1, 1), t).shape == ()


def test_hint_projection_learns_to_match_the_teacher():
    torch.manual_seed(0)
    s = torch.randn(16, 4, 2, 2)
    true_map = torch.randn(6, 4)
    t = torch.einsum("oc,bchw->bohw", true_map, s)
    hint = HintProjection(4, 6)
    opt = torch.optim.Adam(hint.parameters(), lr=0.05)
    first = hint(s, t).item()
    for _ in range(300):
        opt.zero_grad()
        loss = hint(s, t)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first


def test_a_distillation_step_with_hint_trains_student_and_projection():
    spec = ModelSpec("test_efficientnet", 10, (1, 8, 8), 16)
    teacher_spec = ModelSpec("resnet10t", 10, (1, 8, 8), 16)
    teacher = build_network(teacher_spec).eval()
    trainee = build_trainee(build_network(spec), teacher, 1.0, (1, 16, 16))
    assert isinstance(trainee, Trainee) and trainee.hint.proj.weight.shape == (512, 256, 1, 1)
    before = trainee.hint.proj.weight.detach().clone(), trainee.student.get_classifier().weight.detach().clone()
    engine = TorchEngine(trainee, lr=0.1, weight_decay=0.0, total_steps=1, schedule="constant")
    loss = Distillation(4.0, 0.5, hint_weight=1.0, teacher=teacher)
    batch = {"image": torch.randn(4, 1, 16, 16), "label": torch.randint(0, 10, (4,))}
    assert math.isfinite(train_step(engine, loss, batch))
    assert not torch.equal(before[0], trainee.hint.proj.weight)
    assert not torch.equal(before[1], trainee.student.get_classifier().weight)


def test_distillation_takes_its_targets_from_the_teacher_or_the_batch_alike():
    """Offline soft targets (the teacher's logits stored beside the views) give the same loss as
    the teacher run on the batch online."""
    teacher = build_network(ModelSpec("resnet10t", 10, (1, 8, 8), 16)).eval()
    student = Trainee(build_network(ModelSpec("test_efficientnet", 10, (1, 8, 8), 16)).eval())
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    with torch.no_grad():
        stored = teacher(x)
        online = Distillation(4.0, 0.3, teacher=teacher)(student, {"image": x, "label": y})
        offline = Distillation(4.0, 0.3, logits_column="teacher_logits")(student, {"image": x, "label": y,
                                                                               "teacher_logits": stored})
    assert torch.allclose(online, offline)
    with pytest.raises(ValueError, match="either a teacher or a logits column"):
        Distillation(4.0, 0.3)
    with pytest.raises(ValueError, match="hint loss needs"):
        Distillation(4.0, 0.3, hint_weight=1.0, logits_column="teacher_logits")


def test_hint_needs_the_online_teacher():
    with pytest.raises(ConfigError, match="hint_weight needs student.teacher_mode=online"):
        load_config(None, ["student.hint_weight=0.5", "student.teacher_mode=offline"])


def test_width_and_depth_change_the_student():
    base = build_network(ModelSpec("test_efficientnet", 10, (1, 8, 8), 16))
    narrow = build_network(ModelSpec("test_efficientnet", 10, (1, 8, 8), 16, width=0.5))
    deep = build_network(ModelSpec("test_efficientnet", 10, (1, 8, 8), 16, depth=2.0))
    count = lambda n: sum(p.numel() for p in n.parameters())  # noqa: E731
    assert count(narrow) < count(base) < count(deep)
    with pytest.raises(ValueError, match="no width/depth multiplier"):
        build_network(ModelSpec("resnet10t", 10, (1, 8, 8), 16, width=0.5))


def test_plain_cnn_students_scale_with_width_and_depth_and_speak_timms_interface():
    from raydistill.kd import feature_channels

    base = build_network(ModelSpec("plain_cnn_s", 10, (1, 8, 8), 16))
    narrow = build_network(ModelSpec("plain_cnn_s", 10, (1, 8, 8), 16, width=0.5))
    deep = build_network(ModelSpec("plain_cnn_s", 10, (1, 8, 8), 16, depth=2.0))
    count = lambda n: sum(p.numel() for p in n.parameters())  # noqa: E731
    assert count(narrow) < count(base) < count(deep)
    assert len(deep.features) > len(base.features)  # depth adds conv blocks
    x = torch.randn(2, 1, 16, 16)
    base.eval()
    features = base.forward_features(x)
    assert features.shape == (2, 96, 2, 2)  # stride-2 stem, then 2 strided stages: 16 -> 8 -> 4 -> 2
    assert torch.equal(base.forward_head(features), base(x))
    assert feature_channels(base, (1, 16, 16)) == 96 and base.get_classifier().out_features == 10


def test_alpha_one_ignores_the_teacher_so_no_kd_is_plain_cross_entropy():
    """The compression bench's no-KD student runs kd_loss with alpha=1 and dummy (zero) teacher
    logits: that must be exactly CE, whatever the logits, with no gradient from the soft term."""
    torch.manual_seed(2)
    y = torch.randint(0, 10, (8,))
    grads = []
    for teacher_logits in (torch.zeros(8, 10), 5 * torch.randn(8, 10)):
        s = torch.randn(8, 10, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        loss = kd_loss(s, teacher_logits, y, 4.0, 1.0)
        assert torch.allclose(loss, F.cross_entropy(s, y))
        loss.backward()
        grads.append(s.grad)
    assert torch.equal(grads[0], grads[1])


def test_soft_term_is_kl_teacher_to_student_not_the_reverse():
    """KL is asymmetric: swapping teacher and student (a common slip) changes the value."""
    s, t = torch.tensor([[2.0, 0.0, -2.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    p_t, p_s = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum()
    reverse = (p_s * (p_s.log() - p_t.log())).sum()
    assert not torch.isclose(forward, reverse, rtol=1e-2)
    assert torch.allclose(kd_loss(s, t, torch.tensor([1]), 2.0, 0.0), 4 * forward)


def test_the_report_says_when_kd_did_not_help():
    from raydistill.distill import kd_effect
    from raydistill.report import _kd_line

    worse = kd_effect(with_kd=0.56, without_kd=0.59)
    assert worse["status"] == "did not help" and worse["gain"] == pytest.approx(-0.03)
    assert _kd_line(worse).startswith("**KD did not help**: validation accuracy 0.5600 with KD, 0.5900")
    assert kd_effect(0.9, 0.8)["status"] == "helped" and _kd_line(kd_effect(0.9, 0.8)).startswith("KD helped")
    assert "not measured (student.kd_control=false)" in _kd_line(kd_effect(0.9, None))
