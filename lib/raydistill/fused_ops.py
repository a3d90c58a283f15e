"""Fused augmentation ops: the geometric ops of a run of `data.augment` as one warp, and colour
jitter as one colour matrix, each drawn per sample.

kornia resamples the image once per geometric op and runs colour jitter through HSV. On
64-224 px RGB that made augmentation slower than a torchvision DataLoader, and colour jitter
alone took two thirds of the time. Here each op still draws its own parameters per sample, with
its own probability p:
- consecutive random_resized_crop / flip / rotation / affine ops compose into one 2x3 matrix
  per sample, and the image is resampled once (bilinear, zeros outside), as DALI and
  torchvision's affine kernels do;
- brightness, saturation and hue become one 3x3 matrix per sample (hue as a rotation in YIQ
  space, DALI's ColorTwist), then contrast blends with each view's mean grey level.
- mixup, erasing and noise write into the batch they are given (a fresh batch of views, so no
  caller sees it change): at 224 px every extra pass over a batch is a copy of 150 KB per image,
  and random erasing touches only its rectangles.
Parameters come from torch's global generator, which augment.augment_batch seeds per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GEOMETRIC_OPS = ("random_resized_crop", "flip", "rotation", "affine")
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n)


def _applied(n: int, p: float) -> torch.Tensor:
    """(n,) bool: which samples get an op of probability p."""
    return torch.rand(n) < p


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1),
                        torch.stack([zero, zero, one], -1)], -2)


def _diag_shift(sx: torch.Tensor, sy: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, sy, ty], -1),
                        torch.stack([zero, zero, one], -1)], -2)


def sampling_matrix(spec: dict, n: int) -> torch.Tensor:
    """(n, 3, 3): for each sample, where each output point (normalised coordinates, -1..1) of
    this op reads its input. Samples the op skips (probability 1 - p) get the identity."""
    op, keep = spec["op"], _applied(n, spec["p"])
    if op == "random_resized_crop":
        area = _uniform(n, *spec["scale"])
        log_ratio = _uniform(n, math.log(spec["ratio"][0]), math.log(spec["ratio"][1]))
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # half-extents in normalised units
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        matrix = _diag_shift(w, h, _uniform(n, -1, 1) * (1 - w), _uniform(n, -1, 1) * (1 - h))
    elif op == "flip":
        mirrored = -torch.ones(n)
        ones, zeros = torch.ones(n), torch.zeros(n)
        matrix = (_diag_shift(mirrored, ones, zeros, zeros) if spec["direction"] == "horizontal"
                  else _diag_shift(ones, mirrored, zeros, zeros))
    elif op == "rotation":
        matrix = _rotation(torch.deg2rad(_uniform(n, -spec["degrees"], spec["degrees"])))
    elif op == "affine":
        # Output = shift(rotate(zoom(input))): read at zoom^-1 rotate^-1 (point - shift).
        zoom = 1.0 / _uniform(n, *spec["scale"])
        shift = 2 * spec["translate"]  # a fraction of the side is twice that in -1..1 units
        tx, ty = _uniform(n, -shift, shift), _uniform(n, -shift, shift)
        zeros = torch.zeros(n)
        matrix = (_diag_shift(zoom, zoom, zeros, zeros)
                  @ _rotation(torch.deg2rad(_uniform(n, -spec["degrees"], spec["degrees"])))
                  @ _diag_shift(torch.ones(n), torch.ones(n), -tx, -ty))
    else:
        raise ValueError(f"{op} is not a geometric op")
    return torch.where(keep[:, None, None], matrix, torch.eye(3).expand(n, 3, 3))


class FusedWarp:
    """Consecutive geometric ops, one resampling: image k = op_k(image k-1) reads image 0 at
    A_1 A_2 ... A_k (point), each A drawn per sample by sampling_matrix."""

    def __init__(self, specs: list[dict]):
        self.specs = specs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        matrix = torch.eye(3).expand(n, 3, 3)
        for spec in self.specs:
            matrix = matrix @ sampling_matrix(spec, n)
        grid = F.affine_grid(matrix[:, :2].to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ColorTwist:
    """color_jitter: per sample, brightness b, saturation s and hue angle h as one 3x3 colour
    matrix (hue(h) @ saturation(s) x b), then contrast c around the view's mean grey level.
    On grey images only brightness and contrast apply."""

    def __init__(self, spec: dict):
        self.spec = spec
        yiq = torch.tensor(_RGB_TO_YIQ)
        self.yiq, self.yiq_inverse = yiq, torch.linalg.inv(yiq)
        self.grey = torch.tensor(_GREY)

    def _factors(self, n: int) -> dict:
        s, keep = self.spec, _applied(n, self.spec["p"])

        def draw(lo: float, hi: float, identity: float) -> torch.Tensor:
            return torch.where(keep, _uniform(n, lo, hi), torch.full((n,), identity))

        return {"brightness": draw(1 - s["brightness"], 1 + s["brightness"], 1.0),
                "contrast": draw(1 - s["contrast"], 1 + s["contrast"], 1.0),
                "saturation": draw(1 - s["saturation"], 1 + s["saturation"], 1.0),
                "hue": draw(-s["hue"], s["hue"], 0.0) * 2 * math.pi}  # a fraction of the colour circle

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        f = self._factors(n)
        if channels == 3:
            eye = torch.eye(3).expand(n, 3, 3)
            saturation = f["saturation"][:, None, None] * eye + (1 - f["saturation"])[:, None, None] * self.grey
            cos, sin = f["hue"].cos(), f["hue"].sin()
            rotate_iq = eye.clone()
            rotate_iq[:, 1, 1], rotate_iq[:, 1, 2], rotate_iq[:, 2, 1], rotate_iq[:, 2, 2] = cos, -sin, sin, cos
            colour = self.yiq_inverse @ rotate_iq @ self.yiq @ saturation * f["brightness"][:, None, None]
            grey = self.grey
        else:
            colour, grey = f["brightness"][:, None, None], torch.ones(1)
        # Contrast blends each view with its mean grey level, which is linear in the input's
        # per-channel means: the whole jitter is one matrix and one offset, one pass over pixels.
        flat = x.reshape(n, channels, height * width)
        means = flat.mean(dim=2).float()  # (n, C)
        mean_grey = torch.einsum("c,ncd,nd->n", grey, colour, means)
        c = f["contrast"]
        offset = ((1 - c) * mean_grey)[:, None, None].expand(n, channels, 1)
        out = torch.baddbmm(offset.to(x.dtype), (c[:, None, None] * colour).to(x.dtype), flat)
        return out.reshape(n, channels, height, width)


class MixUp:
    """mixup (Zhang et al. 2018): with probability p a sample becomes (1 - lam) x itself + lam x
    a random partner from the batch, lam ~ U(lambda_range). Returns (views, partner, lam): the
    labels mix with the same partner and weight. Writes into x."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self, x: torch.Tensor):
        n = len(x)
        partner = torch.randperm(n)
        lam = torch.where(_applied(n, self.spec["p"]), _uniform(n, *self.spec["lambda_range"]), torch.zeros(n))
        return x.lerp_(x[partner], lam[:, None, None, None].to(x.dtype)), partner, lam


class RandomErasing:
    """Random erasing (Zhong et al. 2017): with probability p, a rectangle of area fraction
    ~ U(scale) and aspect ratio ~ logU(ratio), placed uniformly, is set to 0. Writes into x."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        area = _uniform(n, *self.spec["scale"]) * height * width
        ratio = _uniform(n, math.log(self.spec["ratio"][0]), math.log(self.spec["ratio"][1])).exp()
        h = (area * ratio).sqrt().round().clamp(1, height)
        w = (area / ratio).sqrt().round().clamp(1, width)
        top, left = (torch.rand(n) * (height - h + 1)).floor(), (torch.rand(n) * (width - w + 1)).floor()
        boxes = torch.stack([top, top + h, left, left + w], 1).long().tolist()
        for i in _applied(n, self.spec["p"]).nonzero().flatten().tolist():
            t, b, l, r = boxes[i]
            x[i, :, t:b, l:r] = 0.0
        return x


class GaussianNoise:
    """Additive gaussian noise of the given std, with probability p per sample. Writes into x."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.where(_applied(len(x), self.spec["p"]), self.spec["std"], 0.0).to(x.dtype)
        return x.addcmul_(torch.randn_like(x), std[:, None, None, None])
