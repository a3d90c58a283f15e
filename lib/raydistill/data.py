"""Data: read a labelled image set, check every row, split by seed, and build the Ray Data
streams that augment training views on the fly.

Sources (`data.source`): a Parquet file or folder, an image folder (one subfolder per class,
PNG/JPEG), each a local path or any pyarrow filesystem URI (s3://, gs://, file://), or
`digits` (bundled). In Parquet, an image cell holds encoded PNG/JPEG bytes or a numeric array
(uint8 on 0..255, or floats on 0..1); a label cell holds an integer class id. Images are kept
as uint8 (N, C, H, W): Parquet images at their native size (resizing to the model's input
happens in `models.to_model_input`, so the served model accepts the same pixels the data set
holds), image-folder images resized to data.image_size as they are decoded (their sizes
differ). `data.channels` converts grey <-> RGB.

Augmentation (`data.augment`, an ordered list of ops) runs in Ray Data tasks on batches with
kornia: every op draws its parameters per sample, seeded by (seed, epoch, row id), so views
are fresh each epoch yet reproducible. Mixup / cutmix turn labels into soft (B, classes) rows.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.artifacts import atomic_write
from raydistill.config import MIXING_OPS, Config


class DataError(RuntimeError):
    """Bad input data: the message names the source, the column or the row."""


@dataclass
class Split:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    num_classes: int
    source: str
    rows_read: int
    rows_skipped: dict[str, int] = field(default_factory=dict)
    class_names: list[str] | None = None  # image folders: class id -> folder name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images as stored: what the served model accepts."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def summary(self, augment: list) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_skipped": dict(self.rows_skipped),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "augmentations": [op.model_dump(mode="json") for op in augment],
            "mixes_labels": any(op.op in MIXING_OPS for op in augment),
            **({"class_names": self.class_names} if self.class_names else {}),
        }


def write_digits_parquet(path: Path) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16) as a uint8 Parquet table."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8).reshape(len(digits.images), -1)
    table = pa.table(
        {
            "image": pa.array(list(pixels), type=pa.list_(pa.uint8())),
            "label": pa.array(digits.target.astype(np.int64)),
        }
    )
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _decode_image(cell) -> np.ndarray:
    """One cell -> uint8 (C, H, W). Raises ValueError with the reason."""
    if isinstance(cell, (bytes, bytearray)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(cell)) as img:
                img = img.convert("RGB" if img.mode in ("RGB", "RGBA", "P", "CMYK") else "L")
                arr = np.asarray(img)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError("undecodable_image") from err
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    arr = np.asarray(cell)
    if arr.dtype == object or arr.size == 0:
        raise ValueError("undecodable_image")
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        if side * side == arr.size:
            arr = arr.reshape(1, side, side)
        elif arr.size % 3 == 0 and math.isqrt(arr.size // 3) ** 2 == arr.size // 3:
            side = math.isqrt(arr.size // 3)
            arr = arr.reshape(3, side, side)
        else:
            raise ValueError("wrong_shape")
    elif arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = arr.transpose(2, 0, 1)
    elif arr.ndim != 3:
        raise ValueError("wrong_shape")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("pixel_out_of_range")
        arr = np.rint(arr * 255.0)
    elif arr.min() < 0 or arr.max() > 255:
        raise ValueError("pixel_out_of_range")
    return arr.astype(np.uint8)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def locate(source: str):
    """(pyarrow filesystem, path, kind) for a local path or URI; kind: parquet | images."""
    from pyarrow import fs as pafs

    try:
        if "://" in source:
            filesystem, path = pafs.FileSystem.from_uri(source)
        else:
            filesystem, path = pafs.LocalFileSystem(), str(Path(source).resolve())
        info = filesystem.get_file_info(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.source '{source}': cannot open ({err})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.source '{source}': no such file or folder")
    if info.type == pafs.FileType.File:
        return filesystem, path, "parquet"
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    if any(e.type == pafs.FileType.File and e.base_name.endswith(".parquet") for e in entries):
        return filesystem, path, "parquet"
    return filesystem, path, "images"


def _read_table(source: str, filesystem, path: str, columns: list[str]) -> pa.Table:
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
        schema = dataset.schema
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.source '{source}': not a readable Parquet file ({err})") from None
    for key, name in zip(("data.image_column", "data.label_column"), columns):
        if name not in schema.names:
            raise DataError(
                f"data.source '{source}' has no column '{name}' (set {key}; columns: {', '.join(schema.names)})"
            )
    try:
        return dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.source '{source}': corrupt Parquet data ({err})") from None


def _parquet_rows(source: str, filesystem, path: str, dcfg):
    """(where, image cell, label) per row of a Parquet file or folder."""
    table = _read_table(source, filesystem, path, [dcfg.image_column, dcfg.label_column])
    cells = table.column(dcfg.image_column).to_pylist()
    labels = table.column(dcfg.label_column).to_pylist()
    return [(f"row {i}", cell, label) for i, (cell, label) in enumerate(zip(cells, labels))], None


def _image_folder_rows(source: str, filesystem, path: str):
    """(where, encoded bytes, class id) per file of an image folder, and the class names.

    Class ids follow the sorted subfolder names. Every file counts as a row: a file that is not
    PNG/JPEG, or one outside a class folder, is a bad row like an undecodable one, never dropped
    unseen. Files are read in parallel threads (I/O bound, and PIL decodes outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from pyarrow import fs as pafs

    files = sorted(
        (e.path for e in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
         if e.type == pafs.FileType.File),
    )
    prefix = path.rstrip("/") + "/"
    classes = sorted(e.base_name for e in filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
                     if e.type == pafs.FileType.Directory)
    if not classes:
        raise DataError(f"data.source '{source}': an image folder needs one subfolder per class; found none")
    class_id = {name: i for i, name in enumerate(classes)}

    def read(file: str):
        parts = file[len(prefix):].split("/")
        where = f"file '{file}'"
        if len(parts) != 2:
            return where, ValueError("outside_class_folder"), None
        if not parts[1].lower().endswith(IMAGE_EXTENSIONS):
            return where, ValueError("not_an_image_file"), None
        with filesystem.open_input_file(file) as f:
            return where, f.readall(), class_id[parts[0]]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(read, files)), classes


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(C, H, W) uint8 -> `channels` channels (0: unchanged). Grey from RGB by ITU-R 601 luma."""
    if channels == 0 or img.shape[0] == channels:
        return img
    if channels == 3 and img.shape[0] == 1:
        return np.repeat(img, 3, axis=0)
    if channels == 1 and img.shape[0] == 3:
        grey = np.tensordot(np.array([0.299, 0.587, 0.114]), img.astype(np.float32), axes=1)
        return np.rint(grey)[None].astype(np.uint8)
    raise ValueError("wrong_shape")


def _resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if img.shape[1:] == (size, size):
        return img
    planes = [np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in img]
    return np.stack(planes)


def load_dataset(cfg: Config, source: str) -> Dataset:
    """Read, check and split `source`. Bad rows fail naming the row (Parquet) or the file (image
    folder), or are skipped and counted by reason (`data.on_bad_rows`)."""
    dcfg = cfg.data
    filesystem, path, kind = locate(source)
    if kind == "parquet":
        rows, class_names = _parquet_rows(source, filesystem, path, dcfg)
    else:
        rows, class_names = _image_folder_rows(source, filesystem, path)
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: Counter[str] = Counter()
    shape = None
    for where, cell, label in rows:
        try:
            if isinstance(cell, ValueError):  # the reader already refused it
                raise cell
            if label is None:
                raise ValueError("missing_label")
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise ValueError("bad_label")
            if label < 0 or (dcfg.num_classes and label >= dcfg.num_classes):
                raise ValueError("label_out_of_range")
            if cell is None:
                raise ValueError("missing_image")
            img = _to_channels(_decode_image(cell), dcfg.channels if kind == "parquet" else dcfg.channels or 3)
            if kind == "images":
                img = _resize_uint8(img, dcfg.image_size)
            shape = shape or img.shape
            if img.shape != shape:
                raise ValueError("wrong_shape")
        except ValueError as err:
            reason = str(err)
            if dcfg.on_bad_rows == "fail":
                raise DataError(
                    f"data.source '{source}' {where}: {reason.replace('_', ' ')} "
                    f"(set data.on_bad_rows=skip to drop such rows and count them)"
                ) from None
            skipped[reason] += 1
            continue
        images.append(img)
        labels.append(int(label))
    if len(images) < 10:
        raise DataError(f"data.source '{source}': only {len(images)} usable rows; need at least 10")
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * dcfg.test_fraction)))
    n_val = max(1, int(round(len(y) * dcfg.val_fraction)))
    test, val, train = np.split(order, [n_test, n_test + n_val])
    num_classes = dcfg.num_classes or (len(class_names) if class_names else int(y.max()) + 1)
    return Dataset(
        train=Split(x[train], y[train]),
        val=Split(x[val], y[val]),
        test=Split(x[test], y[test]),
        num_classes=num_classes,
        source=source,
        rows_read=len(rows),
        rows_skipped=dict(skipped),
        class_names=class_names,
    )


# ---- Ray Data: augmented training views, streamed to the trainers -------------------------


_PIPELINES: dict = {}  # (ops, image size) -> built kornia modules, once per worker process


def build_ops(augment: list[dict], image_size: int) -> list:
    """[(op name, kornia module)] for an ordered `data.augment` list (dicts as dumped)."""
    import warnings

    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment

    key = (json.dumps(augment, sort_keys=True), image_size)
    if key in _PIPELINES:
        return _PIPELINES[key]
    built = []
    for spec in augment:
        op, p = spec["op"], spec["p"]
        if op == "random_resized_crop":
            m = K.RandomResizedCrop((image_size, image_size), scale=tuple(spec["scale"]), ratio=tuple(spec["ratio"]), p=p)
        elif op == "flip":
            m = (K.RandomHorizontalFlip if spec["direction"] == "horizontal" else K.RandomVerticalFlip)(p=p)
        elif op == "rotation":
            m = K.RandomRotation(spec["degrees"], p=p)
        elif op == "affine":
            m = K.RandomAffine(degrees=spec["degrees"], translate=(spec["translate"],) * 2,
                               scale=tuple(spec["scale"]), p=p)
        elif op == "color_jitter":
            m = K.ColorJitter(spec["brightness"], spec["contrast"], spec["saturation"], spec["hue"], p=p)
        elif op == "gaussian_noise":
            m = K.RandomGaussianNoise(std=spec["std"], p=p)
        elif op == "random_erasing":
            m = K.RandomErasing(scale=tuple(spec["scale"]), ratio=tuple(spec["ratio"]), p=p)
        elif op == "rand_augment":
            # kornia draws which n ops run once per batch and their sign per sample; p gates the whole.
            m = RandAugment(n=spec["n"], m=spec["magnitude"])
            m = K.RandomApply(m, p=p) if p < 1 else m
        elif op == "mixup":
            m = K.RandomMixUpV2(lambda_val=tuple(spec["lambda_range"]), p=p, data_keys=["input", "class"])
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
    """Run the ops on pixels x (B, C, S, S) on 0..1. Returns (views on 0..1, labels): the class
    ids (B,) as given, or soft labels (B, num_classes) once a mixing op has run."""
    import torch
    import torch.nn.functional as F

    soft = None
    for name, module in ops:
        if name in MIXING_OPS:
            if soft is None:
                if not num_classes:
                    raise ValueError(f"augment op {name} mixes labels: it needs the number of classes")
                soft = F.one_hot(torch.as_tensor(labels).long(), num_classes).float()
            # Pass row indices as the "class": kornia returns (row, partner row, partner's weight).
            x, mix = module(x, torch.arange(len(x), dtype=x.dtype))
            mix = mix.reshape(-1, len(x), 3)
            for step in mix:  # cutmix may paste several times
                partner, lam = step[:, 1].long(), step[:, 2:3].float()
                soft = (1 - lam) * soft + lam * soft[partner]
        elif name in ("color_jitter", "rand_augment") and x.shape[1] == 1:
            # Colour ops want RGB: grey as three equal planes, back to one (hue/saturation are no-ops).
            x = module(x.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
        else:
            x = module(x)
    return x.clamp(0.0, 1.0), (labels if soft is None else soft)


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
    x = resize(torch.from_numpy(np.ascontiguousarray(batch["image"])).float() / 255.0, image_size)
    with torch.no_grad():
        x, labels = apply_ops(build_ops(augment, image_size), x, batch["label"], num_classes)
        x = normalize(x)
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return {"image": x.numpy(), "label": labels, "id": np.asarray(batch["id"])}


def _block_refs(split: Split, rows_per_block: int) -> list:
    """The split as Arrow blocks in the object store, put there once and shared by all epochs.
    Images are an Arrow tensor column: tasks read them as one (B, C, H, W) array, zero-copy."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    ids = np.arange(len(split), dtype=np.int64)
    return [
        ray.put(pa.table({"image": ArrowTensorArray.from_numpy(split.images[i : i + rows_per_block]),
                          "label": split.labels[i : i + rows_per_block], "id": ids[i : i + rows_per_block]}))
        for i in range(0, len(split), rows_per_block)
    ]


def train_stream(cfg: Config, split: Split, epochs: int, rows_per_epoch: int | None = None,
                 num_classes: int | None = None):
    """All epochs of augmented views as one Ray Data stream (`rows_per_epoch` rows each, so
    every trainer consumes its shard to the end and no work is left running).

    Nothing is materialised: Ray Data augments batches as trainers pull them (up to their
    `data.prefetch_batches` ahead), in tasks that claim `data.cpus_per_task` CPUs and no GPU,
    so on a cluster CPU-only nodes augment while GPU nodes train. One stream instead of one
    pass per epoch keeps the pipeline running across epoch boundaries, so trainers never wait
    for a new execution to start. Each epoch visits the blocks in its own seeded order (no
    all-to-all shuffle: those tasks would claim whole CPUs that the trainers hold) and augments
    with seed (seed, epoch, row id). Rows carry their `id` (row index in the split), so a
    consumer can attach anything per view (e.g. teacher logits) to the very views it sees.
    """
    import ray.data

    refs = _block_refs(split, cfg.data.batch_size)  # one block, one augmentation batch
    parts = []
    for epoch in range(epochs):
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(refs))
        epoch_ds = ray.data.from_arrow_refs([refs[i] for i in order])
        if rows_per_epoch is not None:
            epoch_ds = epoch_ds.limit(rows_per_epoch)
        parts.append(
            epoch_ds.map_batches(
                augment_batch,
                batch_format="numpy",
                batch_size=cfg.data.batch_size,
                num_cpus=cfg.data.cpus_per_task,
                fn_kwargs={
                    "seed": cfg.seed,
                    "epoch": epoch,
                    "image_size": cfg.data.image_size,
                    "augment": cfg.data.augment_spec(),
                    "num_classes": num_classes,
                    "threads": max(1, int(cfg.data.cpus_per_task)),
                },
            )
        )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def resolve_source(cfg: Config, data_dir: Path) -> str:
    """`digits` becomes a Parquet file written once into the run's data folder."""
    if cfg.data.source != "digits":
        return cfg.data.source
    path = data_dir / "digits.parquet"
    if not path.exists():
        write_digits_parquet(path)
    return str(path)


# ---- preview: what the augmentation does, as a picture ------------------------------------


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


def preview_grid(cfg: Config, data: Dataset, count: int = 32, epoch: int = 0, tile: int = 96):
    """A PIL image: `count` training images as the trainers see them in `epoch` (augmented by
    the configured ops, same seeds as the stream), each captioned with its (mixed) label."""
    from PIL import Image, ImageDraw

    count = min(count, len(data.train))
    ids = np.arange(count)
    views = augment_batch({"image": data.train.images[:count], "label": data.train.labels[:count], "id": ids},
                          seed=cfg.seed, epoch=epoch, image_size=cfg.data.image_size,
                          augment=cfg.data.augment_spec(), num_classes=data.num_classes)
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
        draw.text((x + 3, y + tile + 2), _caption(views["label"][i], data.class_names), fill="black")
    return grid


def write_preview(cfg: Config, out: str | Path, count: int = 32) -> Path:
    """Read and check the configured source, save a PNG grid of augmented samples to `out`."""
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset(cfg, resolve_source(cfg, Path(tmp)))
        grid = preview_grid(cfg, data, count)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out
