"""Models: timm architectures by name, the shared input transform, and the served classifier.

Model code knows nothing of DeepSpeed or Ray; sharding lives in `sharding.py`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a trained model from its safetensors file."""

    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of raw pixels the classifier accepts
    image_size: int  # side the network itself sees

    def to_meta(self) -> dict[str, str]:
        meta = asdict(self)
        return {k: ",".join(map(str, v)) if isinstance(v, tuple) else str(v) for k, v in meta.items()}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> "ModelSpec":
        return cls(
            arch=meta["arch"],
            num_classes=int(meta["num_classes"]),
            input_shape=tuple(int(v) for v in meta["input_shape"].split(",")),  # type: ignore[arg-type]
            image_size=int(meta["image_size"]),
        )


def build_network(spec: ModelSpec) -> nn.Module:
    """A timm model with random init (pretrained=False: nothing is downloaded)."""
    import timm

    try:
        return timm.create_model(
            spec.arch, pretrained=False, num_classes=spec.num_classes, in_chans=spec.input_shape[0]
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm architecture '{spec.arch}' (see timm.list_models())") from None
        raise


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Pixels on 0..1 -> roughly zero-mean inputs."""
    return (x - 0.5) / 0.5


def to_model_input(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Raw pixels (B, C, h, w) on 0..1 -> what the network trains on (no augmentation)."""
    return normalize(resize(pixels, size))


class Classifier(nn.Module):
    """The served model: raw pixels on 0..1 in, class logits out (resize + normalise inside)."""

    def __init__(self, net: nn.Module, spec: ModelSpec):
        super().__init__()
        self.net = net
        self.spec = spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.net(to_model_input(pixels, self.spec.image_size))


@torch.no_grad()
def accuracy(net: nn.Module, images: np.ndarray, labels: np.ndarray, image_size: int, batch: int = 256) -> float:
    """Top-1 accuracy of a network on uint8 (N, C, H, W) images."""
    net.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        x = to_model_input(torch.from_numpy(images[i : i + batch]).float() / 255.0, image_size)
        correct += int((net(x).argmax(1).numpy() == labels[i : i + batch]).sum())
    return correct / max(1, len(labels))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, image_size: int, forward=None, batch: int = 256) -> None:
    """Precise BN: re-estimate BatchNorm statistics on clean (un-augmented) training images.

    Running averages gathered over a few dozen augmented steps drift from the statistics of
    real inputs; one forward pass over clean data puts them back (worth ~5 points of test
    accuracy on the demo teacher). `forward` defaults to the model itself (pass a DeepSpeed
    engine's forward to calibrate a sharded model: every rank must call this together).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    forward = forward or model
    for i in range(0, len(images), batch):
        forward(to_model_input(torch.from_numpy(images[i : i + batch]).float() / 255.0, image_size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], runs: int = 50, threads: int = 1) -> dict:
    """Batch-1 CPU latency percentiles of model(pixels) with a fixed thread count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        x = torch.rand(1, *input_shape)
        for _ in range(5):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(prev)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}
