"""The question answering data stage: rows read and checked in Ray Data tasks, split by
context, cut into windows of data.max_length tokens overlapping by data.doc_stride, and
stored as Parquet: per split the windows (tokens, answer token span, each token's character
offsets, the example id) and the examples (id, context, answers) that evaluation scores
against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.config import Config
from raydistill.data import DataError
from raydistill.text import qa
from raydistill.text.data import SPLITS, TextData, fresh_output, good_rows, listing

QA_COLUMNS = ("question", "context", "answers")


@dataclass
class QAData(TextData):
    """Prepared QA splits. rows(split) counts windows (what training steps over);
    class_counts counts examples, answerable ("1") and not ("0")."""

    task: str = "question_answering"
    windows: dict = field(default_factory=dict)  # split -> windows
    doc_stride: int = 32
    max_answer_tokens: int = 30
    allow_no_answer: bool = False  # SQuAD v2.0: some questions have no answer

    @property
    def train_columns(self) -> tuple[str, ...]:
        return (*qa.TOKEN_COLUMNS, *qa.TARGETS)

    def rows(self, split: str) -> int:
        return int(self.windows.get(split, 0))

    def examples(self, split: str) -> int:
        return sum(self.class_counts.get(split, {}).values())

    def majority(self, split: str) -> float:
        """The score of always answering 'no answer' (0 where every question has one)."""
        counts = self.class_counts.get(split) or {}
        total = sum(counts.values())
        return counts.get("0", 0) / total if total else 0.0

    def example_dir(self, split: str) -> str:
        return str(Path(self.root) / f"{split}_examples")

    def gold(self, split: str) -> tuple[dict[str, str], dict[str, list[str]]]:
        """({example id: context}, {example id: gold answer texts}) of a split."""
        import pyarrow.dataset as pads

        table = pads.dataset(self.example_dir(split), format="parquet").to_table(columns=list(qa.EXAMPLE_COLUMNS))
        ids, contexts, answers = (table.column(c).to_pylist() for c in qa.EXAMPLE_COLUMNS)
        return dict(zip(ids, contexts)), {i: [t for t, _ in json.loads(a)] for i, a in zip(ids, answers)}

    def summary(self, augment: list) -> dict:
        """The data summary's keys, for QA: `splits` counts examples, `windows` what they were
        cut into; `num_classes` is 0 (spans, not classes); the majority baseline is the score
        of answering nothing."""
        examples = {s: self.examples(s) for s in SPLITS}
        return {**super().summary(augment), "splits": examples, "examples": examples, "windows": dict(self.windows),
                "doc_stride": self.doc_stride, "max_answer_tokens": self.max_answer_tokens,
                "unanswerable": {s: self.class_counts.get(s, {}).get("0", 0) for s in SPLITS}}


def _check_columns(ds, source: str, wanted: list[str]) -> None:
    columns = ds.columns() or []
    absent = [c for c in wanted if c not in columns]
    if absent:
        raise DataError(f"data.source {source}: no column {', '.join(map(repr, absent))} (the file has "
                        f"{', '.join(columns) or 'no columns'}); set data.question_column / data.context_column / "
                        "data.answers_column")


def _stored_rows(folder: Path) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(str(folder), format="parquet").count_rows()


def prepare(cfg: Config, source: str, out: Path, teacher_tokenizer: str | None = None) -> QAData:
    """Read, check, split, window and store the QA rows under `out` (replacing what was there)."""
    from ray.data.expressions import col

    dcfg = cfg.data
    kind, files = listing(source)
    if kind == "json" and any(Path(f).suffix.lower() == ".json" for f in files):
        kind = "squad"  # a .json file is one SQuAD document; .jsonl holds one row per line
    ds = qa.read_rows(source, kind, files)
    names = {"question": dcfg.question_column, "context": dcfg.context_column, "answers": dcfg.answers_column}
    if kind != "squad":
        _check_columns(ds, source, list(names.values()))
    else:
        names = {c: c for c in QA_COLUMNS}
    checked = ds.map_batches(
        qa.check_qa_rows, batch_format="numpy", zero_copy_batch=False,
        fn_kwargs={**names, "seed": cfg.seed, "val_fraction": dcfg.val_fraction,
                   "test_fraction": dcfg.test_fraction}).materialize()
    good, rows_read, skipped, counts = good_rows(checked, source, dcfg.on_bad_rows, by="answerable")
    tok_dir = fresh_output(out, dcfg.tokenizer or teacher_tokenizer, good.filter(expr=col("split") == "train"),
                           dcfg.vocab_size, ("question", "context"))
    windows = {}
    for split in SPLITS:
        part = good.filter(expr=col("split") == split)
        part.select_columns(list(qa.EXAMPLE_COLUMNS)).write_parquet(str(out / f"{split}_examples"))
        part.map_batches(qa.tokenize_windows, batch_format="numpy", zero_copy_batch=False, num_cpus=dcfg.cpus_per_task,
                         fn_kwargs={"folder": str(tok_dir), "max_length": dcfg.max_length,
                                    "doc_stride": dcfg.doc_stride}
                         ).write_parquet(str(out / split), min_rows_per_file=dcfg.batch_size)
        windows[split] = _stored_rows(out / split)
    data = QAData(root=str(out), source=source, num_classes=0, max_length=dcfg.max_length, rows_read=rows_read,
                  has_pair=True, rows_skipped=dict(skipped), class_counts=counts, windows=windows,
                  doc_stride=dcfg.doc_stride, max_answer_tokens=dcfg.max_answer_tokens,
                  allow_no_answer=any(c.get("0") for c in counts.values()))
    data.write_index()
    return data
