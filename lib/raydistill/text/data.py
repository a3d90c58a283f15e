"""Text data: read rows from Parquet, JSONL or CSV (local or a pyarrow URI), check them,
split them, tokenize them and store the splits, all in Ray Data tasks.

A row is (text, optional text pair, label). A bad row (empty or non-string text, a label that
is not an integer in 0..num_classes-1) fails the stage naming the row, or with
data.on_bad_rows=skip is dropped and counted by reason. Splits are drawn from a seeded hash
of the row's text, so a duplicated text never sits in two splits. The tokenizer is a fast
Hugging Face tokenizer: the configured one, the teacher folder's, or a WordPiece tokenizer
trained here on the training split. Stored splits hold fixed-length token ids
(data.max_length); the trainers trim each batch to its longest row.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raydistill.config import Config
from raydistill.data import DataError, split_of

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # the split of texts without labels (label -1), for the student to distil on
INDEX = "index.json"
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BUNDLED = "docstrings"
READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def resolve_source(cfg: Config, data_dir: Path) -> str:
    """`docstrings` becomes a Parquet file written once into the run's data folder: the
    library of each docstring, or questions on documented parameters (question_answering)."""
    if cfg.data.source != BUNDLED:
        return cfg.data.source
    from raydistill.text.corpus import write_docstrings_parquet, write_parameter_qa_parquet

    path = data_dir / ("parameter_questions.parquet" if cfg.is_qa else "docstrings.parquet")
    if not path.exists():
        (write_parameter_qa_parquet if cfg.is_qa else write_docstrings_parquet)(path)
    return str(path)


def resolve_unlabelled(cfg: Config, data_dir: Path) -> str | None:
    """data.unlabelled_source, `docstrings` written once into the run's data folder."""
    source = cfg.data.unlabelled_source
    if source != BUNDLED:
        if source:
            listing(source, "data.unlabelled_source")  # a missing or unreadable source is named first
        return source
    from raydistill.text.corpus import write_unlabelled_parquet

    path = data_dir / "docstrings_unlabelled.parquet"
    if not path.exists():
        write_unlabelled_parquet(path)
    return str(path)


def _format(source: str, key: str = "data.source") -> str:
    """parquet, json or csv, from the file's (or a folder's files') extension."""
    return listing(source, key)[0]


def listing(source: str, key: str = "data.source") -> tuple[str, list[str]]:
    """(parquet, json or csv, the files), from the file's (or a folder's files') extension."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(source) if "://" in source else (pafs.LocalFileSystem(), str(Path(source).resolve()))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{key} {source}: not found")
    names = [path] if info.type == pafs.FileType.File else [
        i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    kinds = {READERS.get(Path(n).suffix.lower()) for n in names} - {None}
    if len(kinds) != 1:
        raise DataError(f"{key} {source}: text tasks read .parquet, .jsonl or .csv files; "
                        f"found {sorted(kinds) or 'none of them'}")
    files = [n if "://" not in source else f"{source.split('://', 1)[0]}://{n}" for n in names
             if READERS.get(Path(n).suffix.lower())]
    return kinds.pop(), files


def read_source(source: str, key: str = "data.source"):
    """The source as a Ray Data dataset, read on the workers."""
    import ray.data

    kind = _format(source, key)
    if kind == "parquet":
        return ray.data.read_parquet(source)
    if kind == "json":
        return ray.data.read_json(source, lines=True)
    return ray.data.read_csv(source)


def _class_names(source: str, kind: str) -> list[str] | None:
    """Class names a Parquet source keeps in its schema metadata (the bundled set does)."""
    if kind != "parquet":
        return None
    import pyarrow.dataset as pads

    meta = pads.dataset(source, format="parquet").schema.metadata or {}
    raw = meta.get(b"class_names")
    return json.loads(raw) if raw else None


# ---- checking and splitting (Ray Data tasks) ---------------------------------------------

def _as_label(value) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return None


def text_problem(t, p, text: str, pair: str | None) -> str:
    """Why a row's text (and pair) cannot be read, '' when it can."""
    if not isinstance(t, str):
        return f"{text} is not a string"
    if not t.strip():
        return f"empty {text}"
    if pair and not (isinstance(p, str) and p.strip()):
        return f"empty or non-string {pair}"
    return ""


def check_rows(batch: dict, *, text: str, pair: str | None, label: str, num_classes: int, seed: int,
               val_fraction: float, test_fraction: float) -> dict:
    """Each row's text(s), label and split, and why it is bad ('' for a good row)."""
    texts, pairs, labels, reasons, splits = [], [], [], [], []
    pair_values = batch[pair] if pair else [None] * len(batch[text])
    for t, p, y in zip(batch[text], pair_values, batch[label]):
        y = _as_label(y)
        reason = text_problem(t, p, text, pair)
        if not reason and y is None:
            reason = f"{label} is not an integer"
        elif not reason and not 0 <= y < num_classes:
            reason = f"{label} out of range 0..{num_classes - 1}"
        good = not reason
        texts.append(t if good else "")
        pairs.append((p if good else "") if pair else "")
        labels.append(y if good else -1)
        reasons.append(reason)
        key = f"{t}\0{p}" if good else ""
        splits.append(split_of(key, seed, val_fraction, test_fraction) if good else "")
    return {"text": np.array(texts, dtype=object), "text_pair": np.array(pairs, dtype=object),
            "label": np.array(labels, dtype=np.int64), "reason": np.array(reasons, dtype=object),
            "split": np.array(splits, dtype=object)}


HELD_OUT = "in the val or test split"


def pair_key(text: str, pair: str | None) -> str:
    """What identifies a row's text(s) across the labelled and unlabelled sources."""
    import hashlib

    return hashlib.sha256(f"{text}\0{pair or ''}".encode()).hexdigest()[:20]


def check_unlabelled(batch: dict, *, text: str, pair: str | None, held_out: frozenset) -> dict:
    """Each unlabelled row's text(s) (label -1), and why it is bad or dropped ('' keeps it): a
    text of the val or test split is dropped, or the student would learn the teacher's answers
    on the very texts it is scored on."""
    texts, pairs, reasons = [], [], []
    pair_values = batch[pair] if pair else [None] * len(batch[text])
    for t, p in zip(batch[text], pair_values):
        reason = text_problem(t, p, text, pair) or (HELD_OUT if pair_key(t, p) in held_out else "")
        texts.append("" if reason else t)
        pairs.append("" if reason or not pair else p)
        reasons.append(reason)
    return {"text": np.array(texts, dtype=object), "text_pair": np.array(pairs, dtype=object),
            "label": np.full(len(texts), -1, dtype=np.int64), "reason": np.array(reasons, dtype=object)}


# ---- tokenizer ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str):
    """A fast tokenizer from a local folder (cached per process: Ray Data tasks reuse it)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"tokenizer {folder}: cannot be loaded ({str(err).splitlines()[0][:200]})") from None
    if not tok.is_fast:
        raise DataError(f"tokenizer {folder}: a fast (Rust) tokenizer is needed for offset mapping and speed")
    return tok


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def train_wordpiece(texts_ds, vocab_size: int, out: Path, columns=("text", "text_pair")) -> Path:
    """A lowercasing WordPiece tokenizer (BERT's) trained on the training split's texts, in a
    Ray task that streams them: the driver never holds the split."""
    import ray

    @ray.remote(num_cpus=1)
    def train(ds) -> bytes:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)

        def texts():
            for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
                for column in columns:
                    yield from (t for t in batch[column].tolist() if t)

        tok.train_from_iterator(texts(), trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return tok.to_str().encode()

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # Materialized first: the task (1 CPU) would otherwise start the dataset's own tasks, which
    # wait for a CPU that a running Serve replica or trainer may leave it short of.
    raw = ray.get(train.remote(texts_ds.materialize()))
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw.decode()), unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(out))
    return out


def tokenize_rows(batch: dict, *, folder: str, max_length: int, has_pair: bool) -> dict:
    """Token ids of each row, padded to max_length (a Ray Data map_batches function)."""
    tok = load_tokenizer(folder)
    texts = batch["text"].tolist()
    pairs = batch["text_pair"].tolist() if has_pair else None
    enc = tok(texts, pairs, truncation=True, max_length=max_length, padding="max_length",
              return_token_type_ids=True, return_tensors="np")
    return {**{c: enc[c].astype(np.int32) for c in TOKEN_COLUMNS}, "label": batch["label"], "text": batch["text"],
            "text_pair": batch["text_pair"]}


# ---- the prepared data -------------------------------------------------------------------

def _read_token_files(batch: pa.Table, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, columns=columns) for f in batch.column("file").to_pylist()])


@dataclass
class TextData:
    """The prepared text splits: where they are stored and what they hold (small enough to
    send to every worker; never rows)."""

    root: str  # data/text
    source: str
    num_classes: int
    max_length: int
    rows_read: int
    has_pair: bool = False
    rows_skipped: dict[str, int] = field(default_factory=dict)
    class_names: list[str] | None = None
    class_counts: dict = field(default_factory=dict)  # split -> {class id (str): rows}
    task: str = "text_classification"
    unlabelled: dict = field(default_factory=dict)  # {source, rows, skipped} of data.unlabelled_source

    @property
    def train_columns(self) -> tuple[str, ...]:
        """What a training batch holds: the tokens and the targets."""
        return (*TOKEN_COLUMNS, "label")

    @property
    def tokenizer_dir(self) -> str:
        return str(Path(self.root) / "tokenizer")

    def split_dir(self, name: str) -> str:
        return str(Path(self.root) / name)

    def rows(self, split: str) -> int:
        if split == UNLABELLED:
            return self.unlabelled.get("rows", 0)
        return sum(self.class_counts.get(split, {}).values())

    def majority(self, split: str) -> float:
        counts = self.class_counts.get(split) or {}
        total = sum(counts.values())
        return max(counts.values()) / total if total else 0.0

    def dataset(self, split: str, cpus_per_task: float = 0.25):
        """The stored split as a Ray Data dataset: its files read by tasks of `cpus_per_task`
        CPUs (a fraction: they run beside the trainers; read_parquet's file listing would
        claim a whole CPU, which the trainers hold)."""
        import ray.data

        files = sorted(str(p) for p in Path(self.split_dir(split)).glob("*.parquet"))
        return ray.data.from_items([{"file": f} for f in files]).map_batches(
            _read_token_files, batch_size=1, num_cpus=cpus_per_task, batch_format="pyarrow",
            fn_kwargs={"columns": list(self.train_columns)})

    def arrays(self, split: str, columns=None) -> dict[str, np.ndarray]:
        """A whole split as arrays, read in the calling process (a worker's evaluation, export checks)."""
        import pyarrow.dataset as pads

        columns = list(columns or self.train_columns)
        table = pads.dataset(self.split_dir(split), format="parquet").to_table(columns=columns)
        out = {}
        for c in columns:
            col = table.column(c)
            values = col.to_numpy(zero_copy_only=False)
            rows_are_arrays = values.dtype == object and len(values) and isinstance(values[0], np.ndarray)
            out[c] = np.stack(values) if rows_are_arrays else values  # token ids, offsets: (rows, max_length)
        return out

    @classmethod
    def load(cls, root: Path) -> "TextData":
        index = json.loads((Path(root) / INDEX).read_text())
        missing = [s for s in SPLITS if not any(Path(root, s).glob("*.parquet"))]
        if missing or not has_tokenizer(Path(root) / "tokenizer"):
            raise DataError(f"{root}: stored splits or tokenizer are missing; rerun the data stage")
        if index.get("task") == "question_answering":
            from raydistill.text.qa_data import QAData

            return QAData(root=str(root), **index)
        return cls(root=str(root), **index)

    def write_index(self) -> None:
        index = {k: v for k, v in self.__dict__.items() if k != "root"}
        (Path(self.root) / INDEX).write_text(json.dumps(index, indent=2))

    def summary(self, augment: list) -> dict:
        return {
            "task": self.task,
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_skipped": dict(self.rows_skipped),
            "num_classes": self.num_classes,
            "max_length": self.max_length,
            "splits": {s: self.rows(s) for s in SPLITS},
            "class_counts": self.class_counts,
            "majority_accuracy": {s: self.majority(s) for s in SPLITS},
            "augmentations": [op.model_dump(mode="json") for op in augment],
            "tokenizer": self.tokenizer_dir,
            **({"class_names": self.class_names} if self.class_names else {}),
            **({"unlabelled": self.unlabelled} if self.unlabelled else {}),
        }


def count_rows(checked, by: str = "label") -> tuple[Counter, dict]:
    """({reason: rows} of bad rows, {split: {value of `by`: rows}} of good ones), aggregated by Ray Data."""
    skipped, classes = Counter(), {s: {} for s in SPLITS}
    for row in checked.groupby(["reason", "split", by]).count().take_all():
        n = int(row["count()"])
        if row["reason"]:
            skipped[row["reason"]] += n
        else:
            classes[row["split"]][str(int(row[by]))] = n
    return skipped, classes


def first_bad(checked, limit: int = 3) -> str:
    from ray.data.expressions import col

    rows = checked.filter(expr=col("reason") != "").take(limit)
    return "; ".join(r["reason"] for r in rows)


def good_rows(checked, source: str, on_bad_rows: str, by: str = "label"):
    """(the good rows, rows read, {reason: bad rows}, {split: {value of `by`: rows}}) of checked
    rows; refuses bad rows (on_bad_rows=fail) and an empty split, naming them."""
    from ray.data.expressions import col

    rows_read = checked.count()
    skipped, counts = count_rows(checked, by)
    if skipped and on_bad_rows == "fail":
        raise DataError(f"data.source {source}: {sum(skipped.values())} bad rows of {rows_read} "
                        f"({first_bad(checked)}); fix them or set data.on_bad_rows=skip")
    empty = [s for s in SPLITS if not counts[s]]
    if empty:
        raise DataError(f"data.source {source}: split {', '.join(empty)} would be empty "
                        f"({rows_read - sum(skipped.values())} good rows)")
    return checked.filter(expr=col("reason") == ""), rows_read, skipped, counts


def fresh_output(out: Path, tokenizer: str | None, train_rows, vocab_size: int, columns: tuple) -> Path:
    """`out` emptied, with the tokenizer in out/tokenizer: the given folder's, or WordPiece
    trained on the training rows' text columns. Returns the tokenizer folder."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok_dir = out / "tokenizer"
    if tokenizer:
        load_tokenizer(tokenizer).save_pretrained(str(tok_dir))
    else:
        train_wordpiece(train_rows, vocab_size, tok_dir, columns)
    return tok_dir


def prepare(cfg: Config, source: str, out: Path, teacher_tokenizer: str | None = None) -> TextData:
    """Read, check, split, tokenize and store the text rows under `out` (replacing what was there)."""
    from ray.data.expressions import col

    dcfg = cfg.data
    kind = _format(source)
    unlabelled_source = resolve_unlabelled(cfg, out.parent)  # named before any row is read
    ds = read_source(source)
    columns = ds.columns() or []
    wanted = [c for c in (dcfg.text_column, dcfg.text_pair_column, dcfg.label_column) if c]
    absent = [c for c in wanted if c not in columns]
    if absent:
        raise DataError(f"data.source {source}: no column {', '.join(map(repr, absent))} (the file has "
                        f"{', '.join(columns) or 'no columns'}); set data.text_column / data.label_column")
    ds = ds.select_columns(wanted)
    names = _class_names(source, kind)
    num_classes = dcfg.num_classes or (len(names) if names else None)
    if not num_classes:
        top = ds.max(dcfg.label_column)
        if not isinstance(top, (int, np.integer)):
            raise DataError(f"data.source {source}: column {dcfg.label_column!r} must hold integer class ids "
                            f"(got {type(top).__name__}); set data.num_classes if some labels are bad")
        num_classes = int(top) + 1
    if num_classes < 2:
        raise DataError(f"data.source {source}: labels name fewer than 2 classes")
    checked = ds.map_batches(
        check_rows, batch_format="numpy", zero_copy_batch=False,
        fn_kwargs={"text": dcfg.text_column, "pair": dcfg.text_pair_column, "label": dcfg.label_column,
                   "num_classes": num_classes, "seed": cfg.seed, "val_fraction": dcfg.val_fraction,
                   "test_fraction": dcfg.test_fraction}).materialize()
    good, rows_read, skipped, counts = good_rows(checked, source, dcfg.on_bad_rows)
    parts = {split: good.filter(expr=col("split") == split) for split in SPLITS}
    unlabelled = {}
    if unlabelled_source:
        parts[UNLABELLED], unlabelled = _unlabelled_rows(cfg, unlabelled_source, good)
    # The tokenizer learns from the training split alone: the teacher trains exactly as it would
    # without the unlabelled texts, which only the student reads.
    tok_dir = fresh_output(out, dcfg.tokenizer or teacher_tokenizer, parts["train"], dcfg.vocab_size,
                           ("text", "text_pair"))
    for split, part in parts.items():
        part.map_batches(tokenize_rows, batch_format="numpy", zero_copy_batch=False, num_cpus=dcfg.cpus_per_task,
                         fn_kwargs={"folder": str(tok_dir), "max_length": dcfg.max_length,
                                    "has_pair": bool(dcfg.text_pair_column)}
                         ).write_parquet(str(out / split), min_rows_per_file=dcfg.batch_size)
    data = TextData(root=str(out), source=source, num_classes=num_classes, max_length=dcfg.max_length,
                    rows_read=rows_read, has_pair=bool(dcfg.text_pair_column), rows_skipped=dict(skipped),
                    class_names=names, class_counts=counts, unlabelled=unlabelled)
    data.write_index()
    return data


def _unlabelled_rows(cfg: Config, source: str, good) -> tuple:
    """(the usable rows of data.unlabelled_source, {source, rows, skipped}): bad rows fail the
    stage (or are skipped, data.on_bad_rows=skip); texts of the val or test split are dropped."""
    from ray.data.expressions import col

    dcfg, key = cfg.data, "data.unlabelled_source"
    ds = read_source(source, key)
    wanted = [c for c in (dcfg.text_column, dcfg.text_pair_column) if c]
    absent = [c for c in wanted if c not in (ds.columns() or [])]
    if absent:
        raise DataError(f"{key} {source}: no column {', '.join(map(repr, absent))} (the file has "
                        f"{', '.join(ds.columns() or []) or 'no columns'}); it takes data.text_column")
    held_out = frozenset(pair_key(r["text"], r["text_pair"]) for r in
                         good.filter(expr=col("split") != "train").select_columns(["text", "text_pair"]).iter_rows())
    checked = ds.select_columns(wanted).map_batches(
        check_unlabelled, batch_format="numpy", zero_copy_batch=False,
        fn_kwargs={"text": dcfg.text_column, "pair": dcfg.text_pair_column, "held_out": held_out}).materialize()
    reasons = {r["reason"]: int(r["count()"]) for r in checked.groupby("reason").count().take_all()}
    usable = reasons.pop("", 0)
    bad = sum(n for reason, n in reasons.items() if reason != HELD_OUT)
    if bad and dcfg.on_bad_rows == "fail":
        raise DataError(f"{key} {source}: {bad} bad rows of {usable + sum(reasons.values())} ("
                        f"{'; '.join(r for r in reasons if r != HELD_OUT)}); fix them or set data.on_bad_rows=skip")
    if not usable:
        raise DataError(f"{key} {source}: no usable rows ({reasons or 'the source is empty'})")
    rows = checked.filter(expr=col("reason") == "").select_columns(["text", "text_pair", "label"])
    return rows, {"source": source, "rows": usable, "skipped": reasons}
