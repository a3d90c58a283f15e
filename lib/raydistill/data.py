"""Data: read a labelled image set from storage with Ray Data, check every row on the workers,
split it by a stable hash of each row's key, and store the splits as Parquet shards that every
later stage streams.

Sources (`data.source`): a Parquet file or folder, an image folder (one subfolder per class,
PNG/JPEG), each a local path or any pyarrow filesystem URI (s3://, gs://, file://), or
`digits` (bundled). In Parquet, an image cell holds encoded PNG/JPEG bytes or a numeric array
(uint8 on 0..255, or floats on 0..1); a label cell holds an integer class id. Images are kept
as uint8 (C, H, W): Parquet images at their native size (resizing to the model's input happens
in `models.to_model_input`, so the served model accepts the same pixels the data set holds),
image-folder images resized to data.image_size as they are decoded (their sizes differ).
`data.channels` converts grey <-> RGB.

How it scales: the driver lists the source's files (Parquet) or class folders (image folder)
and nothing more. Ray Data tasks read one Parquet row group, or one hash bucket of an image
folder's files (buckets cut across the class folders, so every stored row group mixes the
classes), decode and check its rows, and write them to the run's `data/splits/<split>/` as Parquet
files whose row groups hold `data.batch_size` rows: the unit every later reader streams (an
augmentation batch, an evaluation batch). The driver receives one small record per task (rows
per split, bad rows by reason, the first bad row's place) and writes `splits/index.json`.
A row's split is decided by a seeded hash of its key (file path relative to the source, plus
the row index for Parquet), so splits are identical across reruns and block layouts, and an
appended file leaves every earlier row in its split.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.artifacts import atomic_write, write_json
from raydistill.config import MIXING_OPS, Config
from raydistill.console import log

SPLITS = ("train", "val", "test")
INDEX = "index.json"
FILES_PER_TASK = 256  # image-folder files one preparation task reads (a Parquet task: one row group)


class DataError(RuntimeError):
    """Bad input data: the message names the source, the column or the row."""


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




# ---- preparation: Ray Data tasks decode, check, split and store ------------------------------


def row_key_hash(key: str, salt: str = "") -> int:
    """A stable 63-bit hash of a row's key (no Python hash(): that is salted per process)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def split_of(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split a row belongs to: a seeded hash of its key, read as a number in [0, 1)."""
    u = row_key_hash(key, f"split-{seed}") / 2**63
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


class _ShardWriter:
    """One task's checked rows, written per split as Parquet files whose row groups each hold
    `rows_per_group` rows. Files are written under a temporary name and renamed, named after
    the task's unit: a retried task overwrites its own output, never adds to it."""

    def __init__(self, out: Path, unit: str, pixels: int, rows_per_group: int):
        self.out, self.unit, self.pixels, self.rows_per_group = out, unit, pixels, rows_per_group
        self.rows: dict[str, list] = {s: [] for s in SPLITS}
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.groups: dict[str, list[int]] = {s: [] for s in SPLITS}
        self.single_class_rows: Counter[str] = Counter()  # rows in row groups that hold one class

    def _path(self, split: str) -> Path:
        return self.out / split / f"{self.unit}.parquet"

    def add(self, split: str, image: np.ndarray, label: int, row_id: int) -> None:
        self.rows[split].append((image, label, row_id))
        if len(self.rows[split]) == self.rows_per_group:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self.rows[split]
        if not rows:
            return
        flat = np.ascontiguousarray(np.stack([r[0].reshape(-1) for r in rows]))
        table = pa.table({
            # Raw bytes, not a list of uint8: Parquet has no 8-bit integer, so a list column
            # stores every pixel as an INT32 and reading a 224 px row group costs 30x more.
            "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.pixels), len(rows), [None, pa.py_buffer(flat)]),
            "label": pa.array([r[1] for r in rows], type=pa.int64()),
            "id": pa.array([r[2] for r in rows], type=pa.int64()),
        })
        if split not in self.writers:
            tmp = self._path(split).with_suffix(".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            self.writers[split] = pq.ParquetWriter(tmp, table.schema, use_dictionary=["label"])
        self.writers[split].write_table(table, row_group_size=len(rows))
        self.groups[split].append(len(rows))
        if len(rows) > 1 and len({r[1] for r in rows}) == 1:
            self.single_class_rows[split] += len(rows)
        self.rows[split] = []

    def close(self) -> dict:
        """{split: [file name, [rows per row group], sha256]} of what was written."""
        written = {}
        for split in SPLITS:
            self._flush(split)
            if split in self.writers:
                self.writers[split].close()
                tmp, final = self._path(split).with_suffix(".tmp"), self._path(split)
                os.replace(tmp, final)
                sha = hashlib.sha256(final.read_bytes()).hexdigest()
                written[split] = [final.name, self.groups[split], sha]
        return written


@dataclass
class _Checker:
    """The per-row checks and conversions, shared by every preparation task."""

    kind: str  # parquet | images
    shape: tuple  # (C, H, W) every stored image has
    channels: int
    image_size: int
    num_classes: int
    seed: int
    val_fraction: float
    test_fraction: float
    fail_fast: bool

    def image(self, cell, label) -> np.ndarray:
        if isinstance(cell, ValueError):  # the reader already refused it
            raise cell
        if label is None:
            raise ValueError("missing_label")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError("bad_label")
        if label < 0 or (self.num_classes and label >= self.num_classes):
            raise ValueError("label_out_of_range")
        if cell is None:
            raise ValueError("missing_image")
        img = _to_channels(_decode_image(cell), self.channels)
        if self.kind == "images":
            img = _resize_uint8(img, self.image_size)
        if img.shape != self.shape:
            raise ValueError("wrong_shape")
        return img

    def run(self, rows, out: Path, unit: str, rows_per_group: int) -> dict:
        """Check and store (key, where, cell, label) rows; one record of what happened."""
        writer = _ShardWriter(out, unit, math.prod(self.shape), rows_per_group)
        read, skipped, first_bad, label_max = 0, Counter(), None, -1
        per_split: dict[str, Counter] = {s: Counter() for s in SPLITS}
        for key, where, cell, label in rows:
            read += 1
            try:
                img = self.image(cell, label)
            except ValueError as err:
                skipped[str(err)] += 1
                first_bad = first_bad or {"where": where, "reason": str(err)}
                if self.fail_fast:
                    break
                continue
            split = split_of(key, self.seed, self.val_fraction, self.test_fraction)
            writer.add(split, img, int(label), row_key_hash(key))
            per_split[split][int(label)] += 1
            label_max = max(label_max, int(label))
        return {"unit": unit, "rows_read": read, "skipped": dict(skipped), "first_bad": first_bad,
                "label_max": label_max, "written": writer.close(), "single_class_rows": dict(writer.single_class_rows),
                "class_counts": {s: {str(k): n for k, n in c.items()} for s, c in per_split.items()}}


def _parquet_units(item: dict, *, filesystem) -> list[dict]:
    """flat_map: one Parquet file -> one unit per row group (a file whose footer cannot be
    read is one unit that reports it)."""
    file = item["file"]
    try:
        with filesystem.open_input_file(file) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as err:
        return [{"file": file, "group": -1, "first_row": 0, "error": str(err)}]
    firsts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    return [{"file": file, "group": i, "first_row": int(firsts[i]), "error": ""} for i in range(meta.num_row_groups)]


def _hidden(path: str) -> bool:
    """.DS_Store, .lock and the like: no one's data, never counted as rows."""
    return path.rsplit("/", 1)[-1].startswith(".")


def _folder_files(item: dict, *, filesystem) -> list[dict]:
    """flat_map: one class folder -> one row per file in it (its listing happens here, on a
    worker). Files in nested folders are rows outside a class folder."""
    from pyarrow import fs as pafs

    return [{"file": e.path, "class_id": item["class_id"]}
            for e in filesystem.get_file_info(pafs.FileSelector(item["folder"], recursive=True))
            if e.type == pafs.FileType.File and not _hidden(e.path)]


def _folder_unit(group: dict, *, source_path: str) -> dict:
    """map_groups: the files of one hash bucket -> one preparation unit, in the order of their
    keys' hashes. Buckets cut across the class folders, so every stored row group mixes the
    classes as the whole folder does: the augmentation stream permutes rows within a row
    group, and a group cut from one class folder would make every training batch one class."""
    order = sorted(range(len(group["file"])), key=lambda i: row_key_hash(_relative(str(group["file"][i]), source_path)))
    return {"files": np.array([json.dumps([str(group["file"][i]) for i in order])], dtype=object),
            "class_ids": np.array([json.dumps([int(group["class_id"][i]) for i in order])], dtype=object)}


def _folder_units(listed, source_path: str):
    """The listed files (a Ray Dataset of file, class_id) -> units of about FILES_PER_TASK files,
    bucketed by a hash of each file's key: the same units on every rerun and block layout."""
    buckets = max(1, math.ceil(listed.count() / FILES_PER_TASK))
    return listed.map_batches(
        _bucket_of, fn_kwargs={"source_path": source_path, "buckets": buckets}, batch_format="numpy",
    ).groupby("bucket").map_groups(_folder_unit, fn_kwargs={"source_path": source_path}, batch_format="numpy")


def _bucket_of(batch: dict, *, source_path: str, buckets: int) -> dict:
    keys = [_relative(str(f), source_path) for f in batch["file"]]
    return {**batch, "bucket": np.array([row_key_hash(k) % buckets for k in keys], dtype=np.int64)}


def _prepare_units(batch: dict, *, kind: str, source_path: str, filesystem, columns: list[str],
                   checker: _Checker, out: str, rows_per_group: int) -> dict:
    """map_batches (one unit per call): read, check, split and store; return one record."""
    records = []
    for i in range(len(next(iter(batch.values())))):
        unit = {k: v[i] for k, v in batch.items()}
        records.append(_prepare_one(unit, kind, source_path, filesystem, columns, checker, Path(out), rows_per_group))
    return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1:] if path.startswith(root + "/") else Path(path).name


def _prepare_one(unit: dict, kind, source_path, filesystem, columns, checker, out, rows_per_group) -> dict:
    if kind == "parquet":
        file, group, first = str(unit["file"]), int(unit["group"]), int(unit["first_row"])
        rel = _relative(file, source_path)
        name = f"{row_key_hash(f'{rel}#{group}'):016x}"
        if group < 0:
            return _unreadable(name, f"file '{file}'", unit["error"])

        def rows():
            with filesystem.open_input_file(file) as f:
                for start, record in _row_group_batches(pq.ParquetFile(f), group, columns, first):
                    cells, labels = record.column(0).to_pylist(), record.column(1).to_pylist()
                    for j, (cell, label) in enumerate(zip(cells, labels)):
                        yield f"{rel}:{start + j}", f"file '{file}' row {start + j}", cell, label

        try:
            return checker.run(rows(), out, name, rows_per_group)
        except (pa.ArrowInvalid, OSError) as err:  # a corrupt page inside the row group
            return _unreadable(name, f"file '{file}' row group {group}", str(err))
    files, class_ids = json.loads(unit["files"]), json.loads(unit["class_ids"])
    name = f"{row_key_hash(_relative(files[0], source_path)):016x}"

    def rows():
        for file, class_id in zip(files, class_ids):
            rel = _relative(file, source_path)
            where = f"file '{file}'"
            if class_id < 0 or rel.count("/") != 1:
                yield rel, where, ValueError("outside_class_folder"), class_id
            elif not file.lower().endswith(IMAGE_EXTENSIONS):
                yield rel, where, ValueError("not_an_image_file"), class_id
            else:
                with filesystem.open_input_file(file) as f:
                    yield rel, where, f.readall(), class_id

    return checker.run(rows(), out, name, rows_per_group)


def _unreadable(unit: str, where: str, detail: str) -> dict:
    """The record of a unit whose Parquet data cannot be read: one bad row, naming the file."""
    return {"unit": unit, "rows_read": 1, "skipped": {"unreadable_file": 1}, "label_max": -1, "written": {},
            "class_counts": {},
            "first_bad": {"where": where, "reason": "unreadable_file", "detail": detail}}


def _row_group_batches(parquet: pq.ParquetFile, group: int, columns: list[str], first_row: int):
    """(index of the first row in the file, record batch) over one row group, in slices."""
    start = first_row
    for record in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
        yield start, record
        start += record.num_rows


def _check_columns(source: str, filesystem, file: str, columns: list[str]) -> None:
    try:
        with filesystem.open_input_file(file) as f:
            names = pq.ParquetFile(f).schema_arrow.names
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.source '{source}': file '{file}' is not a readable Parquet file ({err})") from None
    for key, name in zip(("data.image_column", "data.label_column"), columns):
        if name not in names:
            raise DataError(f"data.source '{source}' has no column '{name}' (set {key}; columns: {', '.join(names)})")


def _parquet_shape(source: str, filesystem, files: list[str], columns: list[str], channels: int) -> tuple:
    """(C, H, W) of the first decodable image among the first rows: what every row must match."""
    for file in files[:4]:
        with filesystem.open_input_file(file) as f:
            try:
                record = next(pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns[:1]), None)
            except (pa.ArrowInvalid, OSError):
                continue
        for cell in (record.column(0).to_pylist() if record is not None else []):
            try:
                return _to_channels(_decode_image(cell), channels).shape
            except (ValueError, TypeError):
                continue
    raise DataError(f"data.source '{source}': no decodable image among the first rows of its first files")


def _list_parquet(source: str, filesystem, path: str) -> list[str]:
    from pyarrow import fs as pafs

    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    return sorted(e.path for e in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                  if e.type == pafs.FileType.File and e.base_name.endswith(".parquet"))


@dataclass
class _Source:
    """Where the rows are and what every image must become."""

    filesystem: object
    path: str
    kind: str  # parquet | images
    shape: tuple  # (C, H, W) of every stored image
    files: list[str] = field(default_factory=list)  # Parquet files
    class_names: list[str] | None = None  # image folder: sorted class folders
    loose: list[str] = field(default_factory=list)  # image folder: files beside the class folders

    def checker(self, cfg: Config, fail_fast: bool) -> _Checker:
        dcfg = cfg.data
        channels = dcfg.channels if self.kind == "parquet" else dcfg.channels or 3
        return _Checker(self.kind, tuple(self.shape), channels, dcfg.image_size, dcfg.num_classes, cfg.seed,
                        dcfg.val_fraction, dcfg.test_fraction, fail_fast)


def _open_source(cfg: Config, source: str) -> _Source:
    """List the source (files or class folders, no rows) and fix the image shape; refuses a
    source that cannot be read, naming it."""
    from pyarrow import fs as pafs

    dcfg = cfg.data
    filesystem, path, kind = locate(source)
    if kind == "parquet":
        files = _list_parquet(source, filesystem, path)
        if not files:
            raise DataError(f"data.source '{source}': no .parquet files")
        columns = [dcfg.image_column, dcfg.label_column]
        _check_columns(source, filesystem, files[0], columns)
        shape = _parquet_shape(source, filesystem, files, columns, dcfg.channels)
        return _Source(filesystem, path, kind, tuple(shape), files=files)
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    class_names = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
    if not class_names:
        raise DataError(f"data.source '{source}': an image folder needs one subfolder per class; found none")
    loose = sorted(e.path for e in entries if e.type == pafs.FileType.File and not _hidden(e.path))
    return _Source(filesystem, path, kind, (dcfg.channels or 3, dcfg.image_size, dcfg.image_size),
                   class_names=class_names, loose=loose)


def prepare(cfg: Config, source: str, out: Path) -> "Dataset":
    """Read, check, split and store `source` under `out` (data/splits). Bad rows fail naming the
    file and row, or are skipped and counted by reason (`data.on_bad_rows`); either way the
    verdict comes before any training starts. The new splits replace the old ones only once
    they are complete: a failure leaves an earlier data stage's splits as they were."""
    import ray.data

    dcfg = cfg.data
    src = _open_source(cfg, source)
    filesystem, path, columns = src.filesystem, src.path, [dcfg.image_column, dcfg.label_column]
    if src.kind == "parquet":
        units = ray.data.from_items([{"file": f} for f in src.files]).flat_map(
            _parquet_units, fn_kwargs={"filesystem": filesystem}, num_cpus=dcfg.cpus_per_task)
    else:
        folders = [{"folder": f"{path.rstrip('/')}/{n}", "class_id": i} for i, n in enumerate(src.class_names)]
        listed = ray.data.from_items(folders).flat_map(_folder_files, fn_kwargs={"filesystem": filesystem},
                                                       num_cpus=dcfg.cpus_per_task)
        if src.loose:  # files beside the class folders: bad rows, counted like any other
            listed = listed.union(ray.data.from_items([{"file": f, "class_id": -1} for f in src.loose]))
        units = _folder_units(listed.materialize(), path)
    checker = src.checker(cfg, fail_fast=dcfg.on_bad_rows == "fail")
    staging = out.parent / f".{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        records = units.map_batches(
            _prepare_units, batch_size=1, num_cpus=dcfg.cpus_per_task,
            fn_kwargs={"kind": src.kind, "source_path": path, "filesystem": filesystem, "columns": columns,
                       "checker": checker, "out": str(staging), "rows_per_group": dcfg.batch_size},
        ).take_all()
        data = _collect(cfg, source, [json.loads(r["record"]) for r in records], src.shape, src.class_names, staging)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data.root = str(out)
    return data


def _collect(cfg: Config, source: str, records: list[dict], shape, class_names, staging: Path) -> "Dataset":
    """The tasks' records -> the verdict on bad rows and the index of the stored splits."""
    dcfg = cfg.data
    skipped: Counter[str] = Counter()
    for r in records:
        skipped.update(r["skipped"])
    bad = sorted((r["first_bad"] for r in records if r["first_bad"]), key=lambda b: b["where"])
    if bad and dcfg.on_bad_rows == "fail":
        first = bad[0]
        detail = f" ({first['detail']})" if first.get("detail") else ""
        raise DataError(f"data.source '{source}' {first['where']}: {first['reason'].replace('_', ' ')}{detail} "
                        f"(set data.on_bad_rows=skip to drop such rows and count them)")
    groups: dict[str, list] = {s: [] for s in SPLITS}
    shas = {}
    for r in sorted(records, key=lambda r: r["unit"]):
        for split, (name, sizes, sha) in r["written"].items():
            groups[split].extend([f"{split}/{name}", g, n] for g, n in enumerate(sizes))
            shas[f"{split}/{name}"] = sha
    counts = {s: sum(n for _, _, n in groups[s]) for s in SPLITS}
    usable = sum(counts.values())
    if usable < 10:
        raise DataError(f"data.source '{source}': only {usable} usable rows; need at least 10")
    for split in SPLITS:
        if counts[split] == 0:
            raise DataError(f"data.source '{source}': the {split} split is empty ({usable} usable rows, "
                            f"data.val_fraction={dcfg.val_fraction}, data.test_fraction={dcfg.test_fraction}): "
                            "add rows or raise the fraction")
    label_max = max(r["label_max"] for r in records)
    num_classes = dcfg.num_classes or (len(class_names) if class_names else label_max + 1)
    class_counts = {s: Counter() for s in SPLITS}
    for r in records:
        for split, per_class in r["class_counts"].items():
            class_counts[split].update(per_class)
    _check_classes(source, class_counts, class_names, dcfg)
    if _sorted_by_label(records, class_counts, dcfg.batch_size):
        log(f"data.source '{source}': most training rows sit in row groups of a single class (rows sorted "
            "by label?): mixing the stored training rows, so that training batches mix the classes")
        _mix_train_split(staging, groups, shas, math.prod(shape), dcfg.batch_size, dcfg.cpus_per_task)
    data = Dataset(root=str(staging), shape=tuple(int(v) for v in shape), num_classes=num_classes, source=source,
                   rows_read=sum(r["rows_read"] for r in records), rows_skipped=dict(skipped),
                   class_names=class_names, groups=groups, sha256=shas,
                   class_counts={s: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for s, c in class_counts.items()})
    write_json(staging / INDEX, data.index())
    return data


def _check_classes(source: str, counts: dict[str, Counter], class_names: list[str] | None, dcfg) -> None:
    """Refuse a data set a classifier cannot learn from: a single class, or (image folders) a
    class folder too small to have a row in every split: such a class is never trained on,
    or never validated or tested."""
    present = sorted({int(k) for c in counts.values() for k in c}, key=int)
    if len(present) < 2:
        only = class_names[present[0]] if class_names and present else (present[0] if present else "none")
        raise DataError(f"data.source '{source}' holds a single class ({only!r}): a classifier needs at "
                        "least two (one subfolder per class, or two distinct labels)")
    if not class_names:
        return
    for class_id, name in enumerate(class_names):
        per_split = {s: counts[s].get(str(class_id), 0) for s in SPLITS}
        if min(per_split.values()) == 0:
            need = math.ceil(1 / min(dcfg.val_fraction, dcfg.test_fraction))
            raise DataError(
                f"data.source '{source}': class folder '{name}' has {sum(per_split.values())} usable images, "
                f"too few for every split to hold one (train/val/test = {per_split['train']}/{per_split['val']}/"
                f"{per_split['test']}; the smallest split takes 1 in {need}): add images, or remove the folder")


def _sorted_by_label(records: list[dict], class_counts: dict[str, Counter], rows_per_group: int) -> bool:
    """Whether most stored training rows sit in single-class row groups when a random order
    would not explain it (the classes so unequal that pure groups are what chance gives).
    Training batches are cut from row groups, so most would hold one class. A Parquet source
    sorted by label does this; image folders never do (their tasks cut across the folders)."""
    counts = class_counts["train"]
    rows = sum(counts.values())
    pure = sum(r.get("single_class_rows", {}).get("train", 0) for r in records)
    by_chance = sum((n / rows) ** rows_per_group for n in counts.values()) if rows else 1.0
    return len(counts) > 1 and pure > rows / 2 and by_chance < 0.25


def _mix_train_split(staging: Path, groups: dict, shas: dict, pixels: int, rows_per_group: int,
                     cpus_per_task: float) -> None:
    """Rewrite the stored training split in buckets of a hash of each row's id, every bucket's
    rows in hash order: Ray Data's hash shuffle of the stored (already resized) rows, on the
    workers, done only for a split that needs it. The same rows on every rerun and block
    layout; `groups` and `shas` are updated in place."""
    import ray.data

    old = sorted({file for file, _, _ in groups["train"]})
    rows = sum(n for _, _, n in groups["train"])
    mixed = staging / ".mixed"
    records = ray.data.read_parquet([str(staging / f) for f in old]).map_batches(
        _bucket_of_id, fn_kwargs={"buckets": max(1, math.ceil(rows / FILES_PER_TASK))}, batch_format="pyarrow",
        num_cpus=cpus_per_task,
    ).groupby("bucket").map_groups(
        _write_bucket, fn_kwargs={"out": str(mixed), "pixels": pixels, "rows_per_group": rows_per_group},
        batch_format="pyarrow", num_cpus=cpus_per_task,
    ).take_all()
    for file in old:
        (staging / file).unlink()
        shas.pop(file)
    groups["train"] = []
    for r in sorted((json.loads(r["record"]) for r in records), key=lambda r: r["unit"]):
        name, sizes, sha = r["written"]["train"]
        os.replace(mixed / "train" / name, staging / "train" / name)
        groups["train"].extend([f"train/{name}", g, n] for g, n in enumerate(sizes))
        shas[f"train/{name}"] = sha
    shutil.rmtree(mixed)


def _bucket_of_id(table: pa.Table, *, buckets: int) -> pa.Table:
    ids = table.column("id").to_numpy()
    return table.append_column("bucket", pa.array(ids % buckets, type=pa.int64()))


def _write_bucket(table: pa.Table, *, out: str, pixels: int, rows_per_group: int) -> pa.Table:
    """map_groups: one bucket's training rows -> one stored file, rows in id order."""
    table = table.sort_by("id")
    writer = _ShardWriter(Path(out), f"mixed-{table.column('bucket')[0].as_py():06d}", pixels, rows_per_group)
    flat = _flat_pixels(table.column("image").combine_chunks(), pixels)
    for i, (label, row_id) in enumerate(zip(table.column("label").to_pylist(), table.column("id").to_pylist())):
        writer.add("train", flat[i * pixels:(i + 1) * pixels], label, row_id)
    record = {"unit": writer.unit, "written": writer.close()}
    return pa.table({"record": [json.dumps(record)]})


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the complete `staging` folder (the old one removed only after)."""
    old = out.parent / f".{out.name}-old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


# ---- the stored splits -----------------------------------------------------------------------


@dataclass
class Dataset:
    """The prepared data: where its splits are stored and what they hold. Small enough to send
    to every worker: it holds the index of the stored row groups, never rows."""

    root: str  # data/splits
    shape: tuple  # (C, H, W) of the stored images: what the served model accepts
    num_classes: int
    source: str
    rows_read: int
    rows_skipped: dict[str, int] = field(default_factory=dict)
    class_names: list[str] | None = None  # image folders: class id -> folder name
    groups: dict = field(default_factory=dict)  # split -> [[file, row group, rows], ...]
    sha256: dict = field(default_factory=dict)  # file -> sha256
    class_counts: dict = field(default_factory=dict)  # split -> {class id (str): rows}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape)  # type: ignore[return-value]

    @property
    def train(self) -> "SplitRef":
        return SplitRef(self, "train")

    @property
    def val(self) -> "SplitRef":
        return SplitRef(self, "val")

    @property
    def test(self) -> "SplitRef":
        return SplitRef(self, "test")

    def split(self, name: str) -> "SplitRef":
        return SplitRef(self, name)

    def index(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "root"}

    def majority(self, split: str) -> float:
        """The majority-class baseline: the accuracy of always answering the split's most
        frequent class (the bar any trained model must clear)."""
        counts = self.class_counts.get(split) or {}
        total = sum(counts.values())
        return max(counts.values()) / total if total else 0.0

    @classmethod
    def load(cls, root: Path) -> "Dataset":
        """The splits a finished data stage stored (its index names every file and row group)."""
        index = json.loads((root / INDEX).read_text())
        missing = [f for f in index["sha256"] if not (root / f).is_file()]
        if missing:
            raise DataError(f"{root}: stored split files are missing ({', '.join(missing[:3])}); rerun the data stage")
        return cls(root=str(root), **{**index, "shape": tuple(index["shape"])})

    def summary(self, augment: list) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_skipped": dict(self.rows_skipped),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "splits": {s: len(self.split(s)) for s in SPLITS},
            "class_counts": self.class_counts,
            "majority_accuracy": {s: self.majority(s) for s in SPLITS},
            "augmentations": [op.model_dump(mode="json") for op in augment],
            "mixes_labels": any(op.op in MIXING_OPS for op in augment),
            **({"class_names": self.class_names} if self.class_names else {}),
        }


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # (B, C, H, W) uint8
    labels: np.ndarray  # (B,) int64
    ids: np.ndarray  # (B,) int64, the row's stable id


def _flat_pixels(images: pa.Array, pixels: int) -> np.ndarray:
    """A stored byte column's images as one flat uint8 array, zero-copy."""
    return np.frombuffer(images.buffers()[1], dtype=np.uint8, count=len(images) * pixels, offset=images.offset * pixels)


def read_group(root: str, file: str, group: int, shape: tuple) -> Batch:
    """One stored row group (`data.batch_size` rows) as arrays; images zero-copy from Arrow."""
    table = pq.ParquetFile(Path(root) / file).read_row_group(group)
    column = table.column("image")
    images = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if pa.types.is_fixed_size_binary(images.type):
        flat = _flat_pixels(images, math.prod(shape))
    else:  # splits stored as lists of uint8, before the byte column
        flat = images.flatten().to_numpy(zero_copy_only=False)
    return Batch(flat.reshape(-1, *shape), table.column("label").to_numpy(), table.column("id").to_numpy())


class SplitRef:
    """One stored split, read a row group at a time: nothing holds the whole split."""

    def __init__(self, data: Dataset, name: str):
        self.data, self.name = data, name

    @property
    def groups(self) -> list:
        return self.data.groups[self.name]

    def __len__(self) -> int:
        return sum(n for _, _, n in self.groups)

    def read(self, group: list) -> Batch:
        return read_group(self.data.root, group[0], group[1], self.data.shape)

    def batches(self, rank: int = 0, world: int = 1):
        """This rank's share of the split (every world-th row group), a Batch per row group."""
        for group in self.groups[rank::world]:
            yield self.read(group)

    def chunks(self, size: int, rank: int = 0, world: int = 1):
        """This rank's share (every world-th row group) as (images, labels, rows) chunks of
        exactly `size` rows, the last padded with blank images (only the first `rows` are
        real). Every rank yields as many chunks, so ranks that run collectives per forward
        (ZeRO-3) stay in step, and every forward has one shape (oneDNN caches state per
        input shape: a shape per row-group size grows memory with the data set)."""
        counts = [sum(g[2] for g in self.groups[r::world]) for r in range(world)]
        total = max(-(-n // size) for n in counts)
        images, labels = [], []
        emitted = 0
        for group in self.groups[rank::world]:
            batch = self.read(group)
            images.append(batch.images)
            labels.append(batch.labels)
            while sum(len(y) for y in labels) >= size:
                x, y = np.concatenate(images), np.concatenate(labels)
                yield x[:size], y[:size], size
                emitted += 1
                images, labels = [x[size:]], [y[size:]]
        left = sum(len(y) for y in labels)
        blank = np.zeros((size, *self.data.shape), dtype=np.uint8)
        while emitted < total:
            if left:
                x = np.concatenate([*images, blank[: size - left]])
                y = np.concatenate([*labels, np.zeros(size - left, dtype=np.int64)])
                yield x, y, left
                left = 0
            else:
                yield blank, np.zeros(size, dtype=np.int64), 0
            emitted += 1

    def head(self, rows: int) -> Batch:
        """The first `rows` rows (in stored order): a fixed sample for calibration and probes."""
        parts, have = [], 0
        for group in self.groups:
            if have >= rows:
                break
            parts.append(self.read(group))
            have += len(parts[-1].labels)
        return Batch(np.concatenate([p.images for p in parts])[:rows], np.concatenate([p.labels for p in parts])[:rows],
                     np.concatenate([p.ids for p in parts])[:rows])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split in memory, for small data only (benchmarks on digits, tests)."""
        batch = self.head(len(self))
        return batch.images, batch.labels


def store_arrays(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], rows_per_group: int = 256,
                 num_classes: int | None = None) -> Dataset:
    """In-memory (images uint8 (N, C, H, W), labels) per split, stored as the data stage stores
    splits (rows keep their index as id): for tests, benchmarks and notebooks with arrays at hand."""
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(next(iter(splits.values()))[0].shape[1:])
    groups: dict[str, list] = {s: [] for s in SPLITS}
    shas = {}
    for split, (images, labels) in splits.items():
        writer = _ShardWriter(out, split, math.prod(shape), rows_per_group)
        for i, (img, label) in enumerate(zip(images, labels)):
            writer.add(split, img, int(label), i)
        for name, sizes, sha in writer.close().values():
            groups[split] = [[f"{split}/{name}", g, n] for g, n in enumerate(sizes)]
            shas[f"{split}/{name}"] = sha
    labels_max = max(int(labels.max()) for _, labels in splits.values())
    data = Dataset(root=str(out), shape=shape, num_classes=num_classes or labels_max + 1, source="arrays",
                   rows_read=sum(len(labels) for _, labels in splits.values()), groups=groups, sha256=shas)
    write_json(out / INDEX, data.index())
    return data


def resolve_source(cfg: Config, data_dir: Path) -> str:
    """`digits` becomes a Parquet file written once into the run's data folder."""
    if cfg.data.source != "digits":
        return cfg.data.source
    path = data_dir / "digits.parquet"
    if not path.exists():
        write_digits_parquet(path)
    return str(path)


def sample_rows(cfg: Config, source: str, count: int) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """The first `count` good rows of a source, read and checked on this process: a preview
    needs a few, not a prepared data set."""
    from pyarrow import fs as pafs

    dcfg = cfg.data
    src = _open_source(cfg, source)
    filesystem, path, columns = src.filesystem, src.path, [dcfg.image_column, dcfg.label_column]

    def rows():
        if src.kind == "parquet":
            for file in src.files:
                with filesystem.open_input_file(file) as f:
                    for record in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
                        yield from zip(record.column(0).to_pylist(), record.column(1).to_pylist())
            return
        # Round-robin over the classes: a preview shows every class.
        listed = [sorted(e.path for e in filesystem.get_file_info(pafs.FileSelector(f"{path}/{name}"))
                         if e.type == pafs.FileType.File and e.path.lower().endswith(IMAGE_EXTENSIONS))[:count]
                  for name in src.class_names]
        for turn in range(count):
            for i, files in enumerate(listed):
                if turn < len(files):
                    with filesystem.open_input_file(files[turn]) as f:
                        yield f.readall(), i

    checker = src.checker(cfg, fail_fast=False)
    images, labels = [], []
    for cell, label in rows():
        try:
            images.append(checker.image(cell, label))
        except ValueError:
            continue
        labels.append(int(label))
        if len(labels) == count:
            break
    if not labels:
        raise DataError(f"data.source '{source}': no usable rows")
    return np.stack(images), np.asarray(labels, dtype=np.int64), src.class_names
