"""Data: read a labelled image table, check every row, split by seed, and build the
Ray Data streams that augment training views on the fly.

An image cell holds encoded PNG/JPEG bytes or a numeric array (uint8 on 0..255, or floats on
0..1); a label cell holds an integer class id. Images are kept as uint8 (N, C, H, W) at their
native size; resizing to the model's input happens in `models.to_model_input`, so the served
model accepts the same pixels the data set holds.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.config import AugmentConfig, Config


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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images as stored: what the served model accepts."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def summary(self, augment: AugmentConfig) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_skipped": dict(self.rows_skipped),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "augmentations": augment.model_dump(),
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


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


def _read_table(source: str, columns: list[str]) -> pa.Table:
    try:
        schema = pq.read_schema(source)
    except FileNotFoundError:
        raise DataError(f"data.source '{source}': no such file") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.source '{source}': not a readable Parquet file ({err})") from None
    for key, name in zip(("data.image_column", "data.label_column"), columns):
        if name not in schema.names:
            raise DataError(
                f"data.source '{source}' has no column '{name}' (set {key}; columns: {', '.join(schema.names)})"
            )
    try:
        return pq.read_table(source, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.source '{source}': corrupt Parquet data ({err})") from None


def load_dataset(cfg: Config, source: str) -> Dataset:
    """Read, check and split `source` (a Parquet file). Bad rows fail or are counted by reason."""
    dcfg = cfg.data
    table = _read_table(source, [dcfg.image_column, dcfg.label_column])
    cells = table.column(dcfg.image_column).to_pylist()
    raw_labels = table.column(dcfg.label_column).to_pylist()
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: Counter[str] = Counter()
    shape = None
    for row, (cell, label) in enumerate(zip(cells, raw_labels)):
        try:
            if label is None:
                raise ValueError("missing_label")
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
                raise ValueError("bad_label")
            if cell is None:
                raise ValueError("missing_image")
            img = _decode_image(cell)
            shape = shape or img.shape
            if img.shape != shape:
                raise ValueError("wrong_shape")
        except ValueError as err:
            reason = str(err)
            if dcfg.on_bad_rows == "fail":
                raise DataError(
                    f"data.source '{source}' row {row}: {reason.replace('_', ' ')} "
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
    return Dataset(
        train=Split(x[train], y[train]),
        val=Split(x[val], y[val]),
        test=Split(x[test], y[test]),
        num_classes=int(y.max()) + 1,
        source=source,
        rows_read=len(cells),
        rows_skipped=dict(skipped),
    )


# ---- Ray Data: augmented training views, streamed to the trainers -------------------------


def augment_batch(batch: dict, *, seed: int, epoch: int, image_size: int, augment: dict) -> dict:
    """Ray Data map_batches fn: uint8 native images -> augmented, normalised model inputs.

    Randomness is fresh per sample and per epoch yet reproducible: the generator is seeded from
    (seed, epoch, first row id of the batch).
    """
    import kornia.augmentation as K
    import torch

    from raydistill.models import normalize, resize

    aug = AugmentConfig(**augment)
    torch.manual_seed(hash((seed, epoch, int(batch["id"][0]))) % (2**63))
    x = resize(torch.from_numpy(np.ascontiguousarray(batch["image"])).float() / 255.0, image_size)
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((image_size, image_size), scale=(aug.crop_scale_min, 1.0), p=1.0),
        K.RandomAffine(
            degrees=aug.rotation_deg,
            translate=(aug.shift, aug.shift),
            scale=(aug.scale_min, aug.scale_max),
            p=1.0,
        ),
    )
    with torch.no_grad():
        x = pipeline(x)
        if aug.noise_std > 0:
            x = x + aug.noise_std * torch.randn_like(x)
        x = normalize(x.clamp(0.0, 1.0))
    return {"image": x.numpy(), "label": batch["label"]}


def _block_refs(split: Split, rows_per_block: int = 128) -> list:
    """The split as pandas blocks in the object store, put there once and shared by all epochs."""
    import pandas as pd
    import ray

    ids = np.arange(len(split), dtype=np.int64)
    return [
        ray.put(pd.DataFrame({"image": list(split.images[i : i + rows_per_block]),
                              "label": split.labels[i : i + rows_per_block], "id": ids[i : i + rows_per_block]}))
        for i in range(0, len(split), rows_per_block)
    ]


def train_stream(cfg: Config, split: Split, epochs: int, rows_per_epoch: int | None = None):
    """All epochs of augmented views as one Ray Data stream (`rows_per_epoch` rows each, so
    every trainer consumes its shard to the end and no work is left running).

    One stream instead of one pass per epoch keeps the pipeline running across epoch
    boundaries, so trainers never wait for a new execution to start. Each epoch visits the
    blocks in its own seeded order (no all-to-all shuffle: those tasks would claim whole CPUs
    that the trainers hold) and augments with seed (seed, epoch, row id).
    """
    import ray.data

    refs = _block_refs(split)
    parts = []
    for epoch in range(epochs):
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(refs))
        epoch_ds = ray.data.from_pandas_refs([refs[i] for i in order])
        if rows_per_epoch is not None:
            epoch_ds = epoch_ds.limit(rows_per_epoch)
        parts.append(
            epoch_ds.map_batches(
                augment_batch,
                batch_format="numpy",
                batch_size=64,
                num_cpus=cfg.data.cpus_per_task,
                fn_kwargs={
                    "seed": cfg.seed,
                    "epoch": epoch,
                    "image_size": cfg.data.image_size,
                    "augment": cfg.data.augment.model_dump(),
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
