"""Augmentation: batched ops (fused_ops, and kornia's) in Ray Data tasks, and the stream of augmented training
views the trainers consume, read from the stored splits.

`data.augment` is an ordered list of ops; every op draws its parameters per sample, seeded by
(seed, epoch, first row id of the batch), so views are fresh each epoch yet reproducible.
Mixup / cutmix turn labels into soft (B, classes) rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raydistill.config import MIXING_OPS, Config
from raydistill.data import SplitRef, read_group, resolve_source, sample_rows

_PIPELINES: dict = {}  # (ops, image size) -> built kornia modules, once per worker process


def build_ops(augment: list[dict], image_size: int) -> list:
    """[(op name, module)] for an ordered `data.augment` list (dicts as dumped). Consecutive
    geometric ops become one fused warp and colour jitter one colour matrix (fused_ops); the
    other ops are kornia's."""
    import warnings

    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment

    from raydistill.fused_ops import GEOMETRIC_OPS, ColorTwist, FusedWarp, GaussianNoise, MixUp, RandomErasing

    key = (json.dumps(augment, sort_keys=True), image_size)
    if key in _PIPELINES:
        return _PIPELINES[key]
    built = []
    for spec in augment:
        op, p = spec["op"], spec["p"]
        if op in GEOMETRIC_OPS:
            if built and built[-1][0] == "warp":
                built[-1][1].specs.append(spec)
            else:
                built.append(("warp", FusedWarp([spec])))
            continue
        if op == "color_jitter":
            m = ColorTwist(spec)
        elif op == "gaussian_noise":
            m = GaussianNoise(spec)
        elif op == "random_erasing":
            m = RandomErasing(spec)
        elif op == "rand_augment":
            # kornia draws which n ops run once per batch and their sign per sample; p gates the whole.
            m = RandAugment(n=spec["n"], m=spec["magnitude"])
            m = K.RandomApply(m, p=p) if p < 1 else m
        elif op == "mixup":
            m = MixUp(spec)
        elif op == "cutmix":
            with warnings.catch_warnings():
                # lambda = pasted area: the partner's share of the view, as mixup's lambda is.
                warnings.simplefilter("ignore", DeprecationWarning)
                m = K.RandomCutMixV2(beta=spec["beta"], p=p, data_keys=["input", "class"], use_correct_lambda=False)
        else:  # the config's discriminated union refuses unknown ops before this
            raise ValueError(f"unknown augment op {op!r}")
        built.append((op, m))
    _PIPELINES[key] = built
    return built


def apply_ops(ops: list, x, labels, num_classes: int | None):
    """Run the ops on pixels x (B, C, S, S) on 0..1, a batch of its own: the ops may write into
    it. Returns (views on 0..1, labels): the class ids (B,) as given, or soft labels
    (B, num_classes) once a mixing op has run."""
    import torch
    import torch.nn.functional as F

    soft = None
    for name, module in ops:
        if name in MIXING_OPS:
            if soft is None:
                if not num_classes:
                    raise ValueError(f"augment op {name} mixes labels: it needs the number of classes")
                soft = F.one_hot(torch.as_tensor(labels).long(), num_classes).float()
            if name == "mixup":
                x, partner, lam = module(x)
                mixes = [(partner, lam[:, None])]
            else:  # kornia's cutmix: pass row indices as the "class"; it returns (row, partner row, weight)
                x, mix = module(x, torch.arange(len(x), dtype=x.dtype))
                mixes = [(step[:, 1].long(), step[:, 2:3].float()) for step in mix.reshape(-1, len(x), 3)]
            for partner, lam in mixes:  # cutmix may paste several times
                soft = (1 - lam) * soft + lam * soft[partner]
        elif name == "rand_augment" and x.shape[1] == 1:
            # Its colour ops want RGB: grey as three equal planes, back to one.
            x = module(x.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
        else:
            x = module(x)
    return x.clamp_(0.0, 1.0), (labels if soft is None else soft)


def augment_batch(batch: dict, *, seed: int, epoch: int, image_size: int, augment: list[dict],
                  num_classes: int | None = None, threads: int | None = None) -> dict:
    """Ray Data map_batches fn: uint8 native images -> augmented, normalised model inputs.

    Randomness is fresh per sample and per epoch yet reproducible: the generators are seeded
    from (seed, epoch, first row id of the batch). The rows are also put in a fresh order each
    epoch (a local shuffle with no data movement), so trainers' batches and mixup partners
    differ from epoch to epoch. With mixup / cutmix the `label` column becomes soft labels
    (B, num_classes) float32; otherwise it stays the class ids (B,).
    """
    import torch

    from raydistill.models import normalize, resize

    if threads:  # inside a Ray Data task: as many torch threads as the task's CPUs, no more
        torch.set_num_threads(threads)
    key = (seed, epoch, int(batch["id"][0]))
    torch.manual_seed(hash(key) % (2**63))
    order = np.random.default_rng(key).permutation(len(batch["id"]))
    batch = {k: np.asarray(batch[k])[order] for k in ("image", "label", "id")}
    x = resize(torch.from_numpy(np.ascontiguousarray(batch["image"])).float().div_(255.0), image_size)
    with torch.no_grad():
        x, labels = apply_ops(build_ops(augment, image_size), x, batch["label"], num_classes)
        x = normalize(x, inplace=True)
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return {"image": x.numpy(), "label": labels, "id": np.asarray(batch["id"])}


def _read_and_augment(batch: dict, *, root: str, shape: tuple, **augment_kwargs) -> dict:
    """map_batches fn (one stored row group per call): read it from storage, augment it for
    its epoch, keep its first `take` rows (an epoch ends part-way through its last group)."""
    read = read_group(root, str(batch["file"][0]), int(batch["group"][0]), shape)
    views = augment_batch({"image": read.images, "label": read.labels, "id": read.ids},
                          epoch=int(batch["epoch"][0]), **augment_kwargs)
    take = int(batch["take"][0])
    return {k: v[:take] for k, v in views.items()}


def epoch_groups(split: SplitRef, seed: int, epoch: int, rows: int | None = None) -> list:
    """The split's row groups in this epoch's seeded order, enough of them for `rows` rows."""
    groups = split.groups
    chosen, have = [], 0
    for i in np.random.default_rng((seed, epoch)).permutation(len(groups)):
        if rows is not None and have >= rows:
            break
        chosen.append(groups[i])
        have += groups[i][2]
    return chosen


def stream_plan(split: SplitRef, seed: int, epochs: int, rows_per_epoch: int | None = None) -> list[dict]:
    """Every row group every epoch reads, in order: {file, group, epoch, take (rows kept)}."""
    items = []
    for epoch in range(epochs):
        left = rows_per_epoch if rows_per_epoch is not None else len(split)
        for file, group, rows in epoch_groups(split, seed, epoch, rows_per_epoch):
            items.append({"file": file, "group": group, "epoch": epoch, "take": min(rows, left)})
            left -= items[-1]["take"]
    return items


def train_stream(cfg: Config, split: SplitRef, epochs: int, rows_per_epoch: int | None = None,
                 num_classes: int | None = None):
    """All epochs of augmented views as one Ray Data stream (`rows_per_epoch` rows each, so
    every trainer consumes its shard to the end and no work is left running).

    Nothing is materialised and nothing passes through the driver: the stream is the list of
    stored row groups every epoch reads (stream_plan), and Ray Data tasks read each one from
    storage and augment it as trainers pull batches (up to their `data.prefetch_batches`
    ahead), claiming `data.cpus_per_task` CPUs and no GPU, so on a cluster CPU-only nodes
    augment while GPU nodes train. One stream for all epochs keeps the pipeline running across
    epoch boundaries. Each epoch visits the row groups in its own seeded order (no all-to-all
    shuffle: those tasks would claim whole CPUs that the trainers hold) and augments with seed
    (seed, epoch, row id). Rows carry their `id`, so a consumer can attach anything per view
    (e.g. teacher logits) to the very views it sees. Consumed in order (the trainers ask Ray
    Data to preserve it), the stream is the same on every run: a resume skips exactly what
    it trained on, and an in-process sweep trial (local_batches) sees the same rows.
    """
    import ray.data

    data = split.data
    items = stream_plan(split, cfg.seed, epochs, rows_per_epoch)
    return ray.data.from_items(items).map_batches(
        _read_and_augment,
        batch_size=1,
        num_cpus=cfg.data.cpus_per_task,
        fn_kwargs={
            "root": data.root,
            "shape": tuple(data.shape),
            **view_settings(cfg),
            "num_classes": num_classes,
            "threads": max(1, int(cfg.data.cpus_per_task)),
        },
    )


def view_settings(cfg: Config) -> dict:
    """What decides the augmented views a trainer sees (besides the split and epochs): the
    seed, the model's input side and the ordered ops."""
    return {"seed": cfg.seed, "image_size": cfg.data.image_size, "augment": cfg.data.augment_spec()}


def rebatch(pieces, size: int):
    """(x, y) arrays of exactly `size` rows from an iterator of (x, y) pieces of any length,
    in order; a tail shorter than `size` is dropped (as iter_torch_batches' drop_last)."""
    xs, ys, have = [], [], 0
    for x, y in pieces:
        xs.append(x)
        ys.append(y)
        have += len(y)
        while have >= size:
            x_all, y_all = np.concatenate(xs), np.concatenate(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, have = [x_all[size:]], [y_all[size:]], have - size


def local_batches(views: dict, split: SplitRef, epochs: int, rows_per_epoch: int, batch_size: int,
                  num_classes: int | None = None):
    """(micro-batch number, {"image", "label"} tensors) in this process: the rows, in order,
    that a single trainer pulls from train_stream with the same view_settings, read and
    augmented here. For an in-process sweep trial, which holds no Ray Data stream."""
    import torch

    data = split.data
    views_of = (_read_and_augment({k: [v] for k, v in item.items()}, root=data.root, shape=tuple(data.shape),
                                  num_classes=num_classes, **views)
                for item in stream_plan(split, views["seed"], epochs, rows_per_epoch))
    for micro, (x, y) in enumerate(rebatch(((v["image"], v["label"]) for v in views_of), batch_size), start=1):
        yield micro, {"image": torch.from_numpy(x), "label": torch.from_numpy(y)}


def _caption(label, class_names: list[str] | None) -> str:
    """A class id, or a soft label's two largest classes with their weights ("3:0.70  5:0.30")."""
    def name(i: int) -> str:
        return class_names[i] if class_names else str(i)

    label = np.asarray(label)
    if label.ndim == 0:
        return name(int(label))
    top = np.argsort(label)[::-1][:2]
    if label[top[1]] < 1e-3:
        return name(int(top[0]))
    return "  ".join(f"{name(int(i))}:{label[i]:.2f}" for i in top)


def preview_grid(cfg: Config, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 class_names: list[str] | None = None, epoch: int = 0, tile: int = 96):
    """A PIL image: `count` training images as the trainers see them in `epoch` (augmented by
    the configured ops, same seeds as the stream), each captioned with its (mixed) label."""
    from PIL import Image, ImageDraw

    count = len(labels)
    views = augment_batch({"image": images, "label": labels, "id": np.arange(count)},
                          seed=cfg.seed, epoch=epoch, image_size=cfg.data.image_size,
                          augment=cfg.data.augment_spec(), num_classes=num_classes)
    pixels = np.clip(views["image"] * 0.5 + 0.5, 0.0, 1.0)  # undo models.normalize
    pixels = np.rint(pixels * 255).astype(np.uint8)
    cols = min(8, count)
    rows = -(-count // cols)
    caption_h = 16
    grid = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(count):
        img = pixels[i]
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        cell = Image.fromarray(img).convert("RGB").resize((tile, tile), Image.NEAREST)
        x, y = (i % cols) * tile, (i // cols) * (tile + caption_h)
        grid.paste(cell, (x, y))
        draw.text((x + 3, y + tile + 2), _caption(views["label"][i], class_names), fill="black")
    return grid


def write_preview(cfg: Config, out: str | Path, count: int = 32) -> Path:
    """Read and check the first rows of the configured source, save a PNG grid of augmented
    samples to `out`."""
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels, class_names = sample_rows(cfg, resolve_source(cfg, Path(tmp)), count)
    num_classes = cfg.data.num_classes or (len(class_names) if class_names else int(labels.max()) + 1)
    grid = preview_grid(cfg, images, labels, num_classes, class_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out
