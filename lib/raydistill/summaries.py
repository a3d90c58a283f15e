"""Each stage's summary.json as a typed object: the keys the design fixes, typed; every other key
a stage writes is kept as an extra attribute (`summary.model_extra`), so a newer stage's
additions never break an older reader."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from raydistill.artifacts import read_json


class _Summary(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class DataSummary(_Summary):
    source: str
    rows_read: int
    rows_skipped: dict[str, int]
    num_classes: int
    splits: dict[str, int]
    augmentations: list[dict]


class SweepSummary(_Summary):
    searcher: str
    scheduler: str
    metric: str
    mode: str
    trials: list[dict]
    best_config: dict
    best_metric: float


class TeacherSummary(_Summary):
    arch: str
    params_total: int
    params_per_rank: list[int]
    zero_stage: int
    world_size: int
    steps: int
    epochs: int
    restarts: int
    accuracy: float
    samples_per_s: float


class StudentSummary(_Summary):
    arch: str
    params_total: int
    accuracy: float
    teacher_accuracy: float
    retention: float | None
    params_ratio: float
    latency_ms_p50: dict[str, float]
    kd: dict


class DeploySummary(_Summary):
    url: str
    model: str
    version: str
    replicas: int
    runtime: str


SUMMARIES: dict[str, type[_Summary]] = {
    "data": DataSummary, "sweep": SweepSummary, "teacher": TeacherSummary, "student": StudentSummary,
    "deploy": DeploySummary,
}


def read_summary(run_root: Path, stage: str) -> _Summary | None:
    """The stage's summary, typed; None when the stage has not written one."""
    path = Path(run_root) / stage / "summary.json"
    return SUMMARIES[stage].model_validate(read_json(path)) if path.exists() else None
