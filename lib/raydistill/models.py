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
    width: float = 1.0  # timm channel_multiplier (efficientnet / mobilenet families)
    depth: float = 1.0  # timm depth_multiplier: repeats of each stage's blocks

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
            width=float(meta.get("width", 1.0)),
            depth=float(meta.get("depth", 1.0)),
        )


class PlainCNN(nn.Module):
    """A shallow plain convnet for fast batch-1 CPU inference: a stride-2 conv stem, then stages
    of conv3x3-BN-ReLU (each later stage halves the map with its first, strided conv), global
    average pooling and a linear classifier.

    Why plain: at batch 1 on a CPU a tiny net's latency is per-operator overhead, not FLOPs.
    Depthwise convs, squeeze-excite gates and SiLU (the efficientnet family) multiply the
    operators; Conv+BN+ReLU folds into one fused Conv per layer in ONNX Runtime. The interface
    is timm's (forward_features / forward_head / get_classifier / num_features), so KD, hint
    loss, pruning and export treat it like any timm model.
    """

    def __init__(self, num_classes: int, in_chans: int, channels: tuple[int, ...], blocks: int,
                 width: float = 1.0, depth: float = 1.0):
        super().__init__()
        widths = [max(4, int(round(c * width))) for c in channels]
        repeats = max(1, int(round(blocks * depth)))

        def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        layers = conv_bn_relu(in_chans, widths[0], 2)  # stem: (B, C, S, S) -> (B, w0, S/2, S/2)
        cin = widths[0]
        for i, cout in enumerate(widths):
            for r in range(repeats):
                layers += conv_bn_relu(cin, cout, 2 if (i > 0 and r == 0) else 1)
                cin = cout
        self.features = nn.Sequential(*layers)  # (B, w_last, S / 2^len(widths), ...)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, classes)
        return self.fc(x.mean((2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False):
        """timm's hook for layer-wise LR decay: parameter name -> depth (each conv-BN-ReLU
        triple of `features` is one layer; the classifier comes last)."""
        def depth(name: str) -> float:
            return int(name.split(".")[1]) // 3 if name.startswith("features.") else float("inf")
        return depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Small named plain convnets (not timm): arch -> (stage channels, conv blocks per stage); width
# and depth scale both, so they sweep like timm's multipliers. xs-m are students; plain_cnn_l
# (4.7M params) is a teacher for small inputs (32x32): its stem halves the map once, where
# timm's ImageNet ResNets take 32x32 down to 8x8 before their first stage and 1x1 by the last.
SMALL_ARCHS: dict[str, tuple[tuple[int, ...], int]] = {
    "plain_cnn_xs": ((16, 32, 64), 1),
    "plain_cnn_s": ((24, 48, 96), 1),
    "plain_cnn_m": ((32, 64, 128), 2),
    "plain_cnn_l": ((64, 128, 256, 512), 2),
}


def build_network(spec: ModelSpec) -> nn.Module:
    """A small named plain convnet (SMALL_ARCHS) or a timm model, with random init
    (pretrained=False: nothing is downloaded)."""
    if spec.arch in SMALL_ARCHS:
        channels, blocks = SMALL_ARCHS[spec.arch]
        return PlainCNN(spec.num_classes, spec.input_shape[0], channels, blocks, spec.width, spec.depth)
    import timm  # only for timm archs: a plain CNN's replica or test need not import it (seconds)


    kwargs = dict(pretrained=False, num_classes=spec.num_classes, in_chans=spec.input_shape[0])
    # Only passed when set: most timm families (ResNets, ViTs) have no such multipliers.
    if spec.width != 1.0:
        kwargs["channel_multiplier"] = spec.width
    if spec.depth != 1.0:
        kwargs["depth_multiplier"] = spec.depth
    try:
        try:  # transformers are built for the input size; convnets take any size and refuse the kwarg
            return timm.create_model(spec.arch, img_size=spec.image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            return timm.create_model(spec.arch, **kwargs)
    except TypeError as err:
        if "multiplier" in str(err):
            raise ValueError(
                f"timm's {spec.arch} has no width/depth multiplier: use width=depth=1, or an "
                "efficientnet / mobilenetv3 family arch (e.g. test_efficientnet, mobilenetv3_small_050)"
            ) from None
        raise
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm architecture '{spec.arch}' (see timm.list_models(), or a small "
                             f"named one: {', '.join(SMALL_ARCHS)})") from None
        raise


def fit_to_state(net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize a freshly built network's layers to the shapes in `state`, in place.

    A structurally pruned network has fewer channels than its arch's default; rebuilding it
    means building the arch, then shrinking each Conv2d / Linear / BatchNorm to the stored
    tensor shapes (a depthwise conv keeps groups == channels). Layers whose shapes already
    match are untouched. Loading `state` afterwards checks every shape strictly.
    """
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
        changed = False
        for attr, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            stored = state.get(prefix + attr)
            if stored is None or stored.shape == tensor.shape:
                continue
            changed = True
            fresh = torch.empty(stored.shape, dtype=tensor.dtype)
            if isinstance(tensor, nn.Parameter):
                setattr(module, attr, nn.Parameter(fresh, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(attr, fresh)
        if not changed:
            continue
        if isinstance(module, nn.Conv2d):
            module.out_channels = module.weight.shape[0]
            if depthwise:
                module.groups = module.in_channels = module.out_channels
            else:
                module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = module.running_mean.shape[0]
    return net


def load_network(state: dict[str, torch.Tensor], meta: dict[str, str]) -> nn.Module:
    """The network stored in a safetensors file (state, header metadata), pruned or not."""
    net = build_network(ModelSpec.from_meta(meta))
    if meta.get("pruned") == "true":
        fit_to_state(net, state)
    net.load_state_dict(state)
    return net


def describe_network(spec: ModelSpec) -> dict:
    """Parameter count and parameter shapes, from a model built on the meta device: checks a
    teacher of any size in the driver without allocating its weights."""
    with torch.device("meta"):
        net = build_network(spec)
    shapes = {name: tuple(p.shape) for name, p in net.state_dict().items()}
    return {"params": count_params(net), "shapes": shapes,
            "grad_checkpointing": _supports_grad_checkpointing(net)}


def _supports_grad_checkpointing(net: nn.Module) -> bool:
    try:
        net.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError):
        return False
    return True


def init_file_matches(path: str, shapes: dict[str, tuple], what: str = "teacher.init_from") -> set[str]:
    """Names in a local safetensors file whose shapes match the model's (header only: cheap
    for a file of any size). Refuses an unreadable file or one that matches nothing."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            given = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{what} {path}: not a readable safetensors file ({err})") from None
    matching = {k for k, shape in given.items() if shapes.get(k) == shape}
    if not matching:
        raise ValueError(f"{what} {path}: no tensor matches the model's names and shapes")
    return matching


def load_matching(net: nn.Module, path: str, what: str = "teacher.init_from") -> list[str]:
    """Initialise from a local safetensors file (a model the user brings): every tensor whose
    name and shape match is loaded; the rest (typically a classifier head for another number
    of classes) keeps its fresh init and is returned. Nothing is pickled."""
    from safetensors.torch import load_file

    own = net.state_dict()
    matching = init_file_matches(path, {k: tuple(v.shape) for k, v in own.items()}, what)
    given = load_file(path)
    net.load_state_dict({k: given[k] for k in matching}, strict=False)
    return sorted(set(own) - matching)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), bilinear."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h == w and size % h == 0:
        # The same pixels as size=(size, size), but exported to ONNX as one Resize with constant
        # scales rather than Shape/Slice/Concat/Resize (3 fewer operators per batch-1 call).
        return F.interpolate(x, scale_factor=float(size // h), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def normalize(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Pixels on 0..1 -> roughly zero-mean inputs (written into x with inplace)."""
    return x.sub_(0.5).div_(0.5) if inplace else (x - 0.5) / 0.5


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


def device_of(net) -> torch.device:
    """Where a module's parameters live; CPU for a callable that places its inputs itself."""
    if isinstance(net, nn.Module):
        for param in net.parameters():
            return param.device
    return torch.device("cpu")


def _clean_inputs(images: np.ndarray, image_size: int, device: torch.device, batch: int = 256):
    """uint8 (N, C, H, W) images -> batches of model inputs on `device`."""
    for i in range(0, len(images), batch):
        yield to_model_input(torch.tensor(images[i : i + batch], device=device).float() / 255.0, image_size)


@torch.no_grad()
def predict_logits(net: nn.Module, images: np.ndarray, image_size: int) -> torch.Tensor:
    """Logits (on the CPU) of a network on uint8 (N, C, H, W) images, in eval mode, on the
    network's own device (a GPU worker's model stays on its GPU)."""
    net.eval()
    out = [net(x).float().cpu() for x in _clean_inputs(images, image_size, device_of(net))]
    return torch.cat(out) if out else torch.empty(0)


def accuracy(net: nn.Module, images: np.ndarray, labels: np.ndarray, image_size: int) -> float:
    """Top-1 accuracy of a network on uint8 (N, C, H, W) images."""
    if len(labels) == 0:
        return 0.0
    predicted = predict_logits(net, images, image_size).argmax(1).numpy()
    return float((predicted == labels).mean())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, image_size: int, forward=None, batch: int = 256,
                          rows: int = 512) -> None:
    """Precise BN: re-estimate BatchNorm statistics on clean (un-augmented) training images.

    Running averages gathered over a few dozen augmented steps drift from the statistics of
    real inputs; one forward pass over clean data puts them back (worth ~5 points of test
    accuracy on the demo teacher). The first `rows` images suffice (the split is already
    shuffled by seed): the estimate is of per-channel means and variances, and a sharded
    teacher pays a parameter gather per forward, every epoch. `forward` defaults to the model
    itself (pass a DeepSpeed engine's forward to calibrate a sharded model: every rank must
    call this together).
    """
    images = images[:rows]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    forward = forward or model
    for x in _clean_inputs(images, image_size, device_of(model), batch):
        forward(x)
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
