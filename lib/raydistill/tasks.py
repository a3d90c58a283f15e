"""One small interface per task: how its data is read and stored, how its teacher and student
train, and which Serve application serves it. The stages (pipeline.py) call these and do not
branch on the task themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raydistill.config import Config


@dataclass(frozen=True)
class Task:
    name: str
    stored: str  # the data folder's subfolder holding the prepared splits
    index: str  # the file in it that a finished data stage writes last
    resolve_source: Callable  # (cfg, data_dir) -> source string
    prepare: Callable  # (cfg, source, out) -> data
    load: Callable  # (out) -> data
    describe: Callable  # (data) -> one log line
    run_teacher: Callable  # (cfg, data, out_dir) -> summary
    run_student: Callable  # (cfg, data, teacher_path, teacher_accuracy, out_dir, teacher_sha256) -> (summary, files)
    check_teacher: Callable  # (cfg, data | None) -> None: refusals before training
    resolve_unlabelled: Callable = lambda cfg, data_dir: None  # -> data.unlabelled_source, resolved


def _image() -> Task:
    from raydistill import data, distill, training

    def describe(d) -> str:
        return (f"data: {d.rows_read} rows read, splits train/val/test = {len(d.train)}/{len(d.val)}/{len(d.test)}, "
                f"skipped {d.rows_skipped or 'none'}")

    def check_teacher(cfg: Config, d=None) -> None:
        if d is None:
            training.check_teacher_network(cfg)
        else:
            training.check_teacher(cfg, training.teacher_spec(cfg, d), len(d.train))

    return Task("image_classification", "splits", data.INDEX, data.resolve_source, data.prepare, data.Dataset.load,
                describe, training.run_teacher, distill.run_student, check_teacher)


def _text(name: str) -> Task:
    from raydistill.text import data, distill, qa_data, train

    def prepare(cfg: Config, source: str, out: Path):
        """A teacher folder's tokenizer, or a pretrained hub model's, unless data.tokenizer names one."""
        from raydistill.text.models import hf_source

        teacher = hf_source(cfg.teacher.arch)
        own = data.has_tokenizer(Path(teacher)) if Path(teacher).is_dir() else bool(cfg.teacher.pretrained)
        stage = qa_data.prepare if cfg.is_qa else data.prepare
        return stage(cfg, source, out, teacher_tokenizer=teacher if own else None)

    def describe(d) -> str:
        rows = "/".join(str(d.rows(s)) for s in data.SPLITS)
        if isinstance(d, qa_data.QAData):
            examples = "/".join(str(d.examples(s)) for s in data.SPLITS)
            what = f"examples train/val/test = {examples} in windows {rows}, doc_stride {d.doc_stride}"
        else:
            what = f"splits train/val/test = {rows}, {d.num_classes} classes"
            if d.unlabelled:
                what += f", {d.unlabelled['rows']} unlabelled texts (dropped {d.unlabelled['skipped'] or 'none'})"
        return f"data: {d.rows_read} rows read, {what}, max_length {d.max_length}, skipped {d.rows_skipped or 'none'}"

    return Task(name, "text", data.INDEX, data.resolve_source, prepare, data.TextData.load,
                describe, train.run_teacher, distill.run_student, train.check_teacher, data.resolve_unlabelled)


def task_of(cfg: Config) -> Task:
    return _text(cfg.task) if cfg.is_text else _image()
