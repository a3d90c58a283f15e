import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydistill.kd import kd_loss
from raydistill.models import Classifier, ModelSpec, accuracy, build_network, recalibrate_batchnorm


def test_kd_loss_limits():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(kd_loss(s, t, y, 4.0, 1.0), F.cross_entropy(s, y))
    assert kd_loss(t, t, y, 4.0, 0.0).abs() < 1e-6  # matching the teacher costs nothing
    assert kd_loss(s, t, y, 4.0, 0.0) > 0


def test_kd_gradient_pulls_student_towards_teacher():
    t = torch.tensor([[4.0, 0.0, 0.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    kd_loss(s, t, torch.tensor([0]), 2.0, 0.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet9000'"):
        build_network(ModelSpec("resnet9000", 10, (1, 8, 8), 16))


def test_classifier_accepts_raw_pixels_at_native_size():
    spec = ModelSpec("test_efficientnet", 10, (1, 8, 8), 16)
    out = Classifier(build_network(spec), spec).eval()(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 10)


def test_recalibrated_batchnorm_matches_clean_data_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    images = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    recalibrate_batchnorm(net, images, image_size=8, batch=16)
    from raydistill.models import to_model_input

    with torch.no_grad():
        feats = net[0](to_model_input(torch.from_numpy(images).float() / 255, 8))
    assert torch.allclose(net[1].running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4)
    assert not net.training and net[1].momentum == 0.1


def test_accuracy_counts_correct_predictions():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.eye(3)[torch.tensor([0, 1, 2, 0])][: len(x)]

    assert accuracy(Fixed(), np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, 0, 0]), 8) == 0.75


def test_integer_upscale_gives_the_same_pixels_as_a_size_based_resize():
    from raydistill.models import resize

    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(resize(x, 16), F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    assert resize(x, 12).shape == (3, 1, 12, 12)  # non-integer factors still resize by size
