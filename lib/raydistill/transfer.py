"""Transfer learning: a teacher that starts from published weights, and the parameter groups
that fine-tune it (a frozen backbone, a lower backbone LR, layer-wise LR decay).

Weights are found the way the Hugging Face hub finds them: `teacher.pretrained: true` names the
architecture's default timm weights (timm/<arch>.<tag>), a string names another hub repository
(org/name) or a local directory holding model.safetensors. A hub repository is read from the
local hub cache (HF_HOME / HF_HUB_CACHE) and downloaded only when the hub is reachable, so an
offline cluster (HF_HUB_OFFLINE=1) needs the weights cached on every node that trains.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"  # the file name timm's hub repositories use


def _hub_repo(arch: str, pretrained: bool | str) -> str:
    if pretrained is not True:
        return str(pretrained)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"teacher.pretrained=true: timm publishes no weights for '{arch}'; name a hub "
                         f"repository (org/name) or a local directory holding {WEIGHTS_FILE}")
    return cfg.hf_hub_id


def weights_path(arch: str, pretrained: bool | str) -> Path:
    """The local safetensors file `teacher.pretrained` names, from a directory or the hub cache.
    Refuses, naming what was looked for and where, weights that are neither on disk nor
    downloadable."""
    local = Path(str(pretrained)).expanduser()
    if pretrained is not True and (local.is_dir() or local.suffix == ".safetensors"):
        path = local / WEIGHTS_FILE if local.is_dir() else local
        if not path.is_file():
            raise ValueError(f"teacher.pretrained {pretrained}: no {path.name} there")
        return path
    repo = _hub_repo(arch, pretrained)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(hf_hub_download(repo, WEIGHTS_FILE))
    except HFValidationError:
        raise ValueError(f"teacher.pretrained {pretrained}: neither a local directory nor a hub "
                         "repository id (org/name)") from None
    except Exception as err:  # offline cache miss, unknown repository, no network: all say the same to a user
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

        why = "the hub is unreachable (HF_HUB_OFFLINE=1)" if HF_HUB_OFFLINE else f"download failed ({type(err).__name__})"
        raise ValueError(
            f"teacher.pretrained: {repo}/{WEIGHTS_FILE} is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
            f"{why}. Download it once where the hub is reachable (`hf download {repo} {WEIGHTS_FILE}`) into "
            "that cache on every training node, or give a local directory") from None


def load_pretrained(net: nn.Module, arch: str, path: Path, num_classes: int, in_chans: int) -> list[str]:
    """Load published weights into a freshly built network; returns the names left at their
    fresh init (the classifier for the data's classes, and whatever else does not fit).
    A timm model goes through timm's own loader, which also adapts a 3-channel stem to grey
    input; other models take every tensor whose name and shape match."""
    from raydistill.models import SMALL_ARCHS, load_matching

    if arch in SMALL_ARCHS:
        return load_matching(net, str(path), what="teacher.pretrained")
    from timm.models import load_pretrained as timm_load

    from safetensors.torch import load_file

    cfg = {**net.pretrained_cfg, "file": str(path), "source": ""}
    # timm drops the checkpoint's classifier when the class count differs from the weights' own.
    # Ours is what the file holds, not the arch's default 1000: read it from the file.
    cfg["num_classes"] = _stored_classes(path, cfg.get("classifier"), default=cfg.get("num_classes"))
    timm_load(net, cfg, num_classes=num_classes, in_chans=in_chans, strict=False)
    stored = load_file(str(path))
    return sorted(k for k, v in net.state_dict().items()
                  if k not in stored or stored[k].shape != v.shape or not torch.equal(stored[k], v))


def _stored_classes(path: Path, classifier: str | tuple | None, default) -> int:
    from safetensors import safe_open

    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    with safe_open(str(path), framework="pt") as f:
        for name in names:
            if f"{name}.weight" in f.keys():
                return f.get_slice(f"{name}.weight").get_shape()[0]
    return default


def layer_ids(net: nn.Module) -> dict[str, int]:
    """Parameter name -> depth (0 = stem, highest = classifier), from the model's group
    matcher (timm's, or PlainCNN's)."""
    from timm.models import group_parameters

    return group_parameters(net, net.group_matcher(coarse=False), reverse=True)


def param_groups(net: nn.Module, *, backbone_lr_scale: float = 1.0, layer_decay: float = 1.0,
                 frozen_steps: int = 0) -> list[dict]:
    """The optimizer's parameter groups for fine-tuning. Each carries `lr_scale` (its share of
    the peak LR) and `frozen_steps` (steps at LR 0), which loop.lr_schedule applies:
    the classifier at the full LR; the backbone at backbone_lr_scale x layer_decay^(layers
    above it), frozen for the first frozen_steps. With the defaults, one group as before."""
    if backbone_lr_scale == 1.0 and layer_decay == 1.0 and frozen_steps == 0:
        return [{"params": list(net.parameters())}]
    head = {id(p) for p in net.get_classifier().parameters()}
    depth = layer_ids(net) if layer_decay != 1.0 else {}
    top = max(depth.values(), default=0)
    groups: dict[tuple[float, int], dict] = {}
    for name, param in net.named_parameters():
        if id(param) in head:
            scale, frozen = 1.0, 0
        else:
            scale, frozen = backbone_lr_scale * layer_decay ** (top - depth.get(name, top)), frozen_steps
        group = groups.setdefault((scale, frozen), {"params": [], "lr_scale": scale, "frozen_steps": frozen})
        group["params"].append(param)
    return list(groups.values())


def describe(groups: list[dict]) -> str:
    """A log line's worth: how many parameters learn at which share of the LR."""
    parts = [f"{sum(p.numel() for p in g['params']):,} at {g.get('lr_scale', 1.0):.3g}x"
             + (f" (frozen {g['frozen_steps']} steps)" if g.get("frozen_steps") else "") for g in groups]
    return "; ".join(parts)

