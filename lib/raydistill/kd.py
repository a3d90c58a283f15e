"""Knowledge-distillation losses: soft targets at temperature T, hard labels, and an optional
hint (feature) loss between an intermediate student map and the teacher's.

Both networks are timm models, so `forward_features` gives the last feature map and
`forward_head` the logits from it: one pass yields both, with no hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """(1 - alpha) * T^2 * KL(teacher_T || student_T) + alpha * CE(student, labels).

    KL is averaged over the batch. T^2 keeps the soft-target gradients on the same scale as the
    hard-label ones as T grows (their magnitude falls as 1/T^2; Hinton et al. 2015).
    alpha = 1 is plain cross-entropy; alpha = 0 learns from the teacher alone.
    labels: class ids (B,), or soft labels (B, classes) when mixup / cutmix mixed the views (the
    hard-label term is then cross-entropy against the mixed labels). A class id of -1 marks a
    row without a label (a text student's unlabelled texts): the soft term alone covers it, and
    the hard term averages over the labelled rows.
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean", log_target=True,
    )
    if labels.dim() == 1 and bool((labels < 0).any()):
        labelled = labels >= 0
        hard = (F.cross_entropy(student_logits[labelled], labels[labelled]) if labelled.any()
                else student_logits.sum() * 0.0)
    else:
        hard = F.cross_entropy(student_logits, labels)
    return (1.0 - alpha) * (t * t) * soft + alpha * hard


class HintProjection(nn.Module):
    """FitNets-style hint: a learned 1x1 conv maps the student's feature map (B, Cs, h, w) to
    the teacher's channels; the loss is the MSE to the teacher's map (B, Ct, H, W).

    Spatial sizes may differ (the student may downsample more or less): the projected map is
    resized to the teacher's with adaptive average pooling (or bilinear upsampling).
    Only trained during distillation; never part of the exported student.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return hint_loss(self.proj(student_features), teacher_features)


def hint_loss(projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE between the projected student map and the teacher's, after matching sizes."""
    size = teacher_features.shape[-2:]
    if projected.shape[-2:] != size:
        if projected.shape[-2] >= size[0] and projected.shape[-1] >= size[1]:
            projected = F.adaptive_avg_pool2d(projected, size)
        else:
            projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
    return F.mse_loss(projected, teacher_features)


def features_and_logits(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last feature map (B, C, h, w), logits (B, classes)) of a timm model in one pass."""
    features = net.forward_features(x)
    return features, net.forward_head(features)


def feature_channels(net: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Channels of a timm model's last feature map (B, C, h, w), found by one probe forward.
    Refuses models whose features are not a map (e.g. a ViT's tokens)."""
    with torch.no_grad():
        probe = torch.zeros(1, *input_shape, device=next(net.parameters()).device)
        was_training = net.training
        net.eval()
        shape = net.forward_features(probe).shape
        net.train(was_training)
    if len(shape) != 4:
        raise ValueError(f"hint loss needs a (B, C, h, w) feature map; {type(net).__name__} gives {tuple(shape)}")
    return int(shape[1])


class Trainee(nn.Module):
    """The student plus, with a hint loss, its feature projection: one module, so DDP syncs the
    projection's gradients too. forward(x, teacher features) -> (logits, hint loss or 0)."""

    def __init__(self, student: nn.Module, hint: HintProjection | None = None):
        super().__init__()
        self.student = student
        self.hint = hint

    def forward(self, x: torch.Tensor, teacher_features: torch.Tensor | None = None):
        if self.hint is None:
            return self.student(x), x.new_zeros(())
        features, logits = features_and_logits(self.student, x)
        return logits, self.hint(features, teacher_features)


def build_trainee(student: nn.Module, teacher: nn.Module | None, hint_weight: float,
                  view_shape: tuple[int, int, int]) -> Trainee:
    hint = None
    if hint_weight > 0:
        hint = HintProjection(feature_channels(student, view_shape), feature_channels(teacher, view_shape))
    return Trainee(student, hint)
