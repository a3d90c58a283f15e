"""The Python API, for notebooks and other tools: the CLI's pipeline without its process
lifecycle. Nothing here blocks, and nothing shuts down a Ray it did not start.

    import raydistill
    cfg = raydistill.load_config("configs/demo.yaml", ["teacher.epochs=3"])
    with raydistill.Pipeline(cfg, storage="runs", name="notebook") as pipe:
        run = pipe.run()                      # sweep -> teacher -> student
        print(run.teacher.accuracy, run.student.retention, run.paths["student_onnx"])
        dep = pipe.deploy()                   # a Ray Serve app; returns once it answers
        ...                                   # requests to dep.url
        dep.shutdown()
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.artifacts import ArtifactError, read_json
from raydistill.artifacts import Run as RunDir
from raydistill.config import Config, load_config
from raydistill.pipeline import PIPELINE, execute, opened
from raydistill.summaries import (DataSummary, DeploySummary, StudentSummary, SweepSummary, TeacherSummary,
                                  read_summary)

# Well-known artifacts of a run, by the name `Run.paths` gives them (present ones only).
ARTIFACTS = {
    "manifest": "manifest.json",
    "sweep_best": "sweep/best.yaml",
    "sweep_plot": "sweep/progress.png",
    "teacher_weights": "teacher/teacher.safetensors",
    "student_weights": "student/student.safetensors",
    "student_onnx": "student/student.onnx",
    "student_int8_onnx": "student/student.int8.onnx",
    "student_report": "student/report.md",
    "serve_config": "deploy/serve_config.yaml",
}


@dataclass(frozen=True)
class Run:
    """What a run directory holds: each stage's summary (typed; None for a stage that has not
    run) and its artifacts' paths."""

    name: str
    root: Path
    data: DataSummary | None = None
    sweep: SweepSummary | None = None
    teacher: TeacherSummary | None = None
    student: StudentSummary | None = None
    deploy: DeploySummary | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def load(cls, storage: str | Path, name: str) -> Run:
        root = Path(storage).expanduser().resolve() / name
        if not (root / "manifest.json").exists():
            raise ArtifactError(f"no run '{name}' under {root.parent} (no manifest.json)")
        summaries = {stage: read_summary(root, stage) for stage in ("data", "sweep", "teacher", "student", "deploy")}
        # Only files the manifest vouches for: a failed attempt may have overwritten one.
        store = RunDir(storage, name)
        vouched = {rel for stage in ("sweep", "teacher", "student", "deploy") for rel in store.good_outputs(stage)}
        paths = {key: root / rel for key, rel in ARTIFACTS.items()
                 if (rel == "manifest.json" or rel in vouched) and (root / rel).exists()}
        return cls(name=name, root=root, paths=paths, **summaries)

    @property
    def summaries(self) -> dict:
        """The stages that have a summary, by stage name."""
        return {stage: s for stage in ("data", "sweep", "teacher", "student", "deploy")
                if (s := getattr(self, stage)) is not None}

    @property
    def manifest(self) -> dict:
        return read_json(self.root / "manifest.json")


@dataclass(frozen=True)
class Deployment:
    """A served student. `shutdown()` removes its Serve application; Ray keeps running."""

    url: str
    model: str
    version: str
    summary: DeploySummary

    def shutdown(self) -> None:
        from ray import serve

        serve.delete(self.model)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class Pipeline:
    """One run of the pipeline, driven from Python.

    Uses the Ray this process is connected to; when there is none, it joins RAY_ADDRESS or
    starts a local Ray, and `close()` (or leaving the `with` block) shuts down only that one."""

    def __init__(self, config: Config | str | Path | None = None, storage: str | Path = "runs",
                 name: str | None = None):
        if not isinstance(config, Config):
            name = name or (Path(config).stem if config else "default")
            config = load_config(config)
        self.config = config
        self.storage = str(storage)
        self.name = name or "default"
        self._started_ray = False

    def run(self, stages: tuple[str, ...] = ("sweep", "teacher", "student"), resume: bool = False) -> Run:
        """Run `stages` (any of sweep, teacher, student, deploy, in pipeline order); stages
        finished earlier with the same config are reused. Returns the run as it stands after."""
        unknown = set(stages) - set(PIPELINE)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {list(PIPELINE)}")
        ordered = tuple(s for s in PIPELINE if s in stages)
        with opened(self.config, self.storage, self.name, ordered) as (run, cfg, data, started):
            self._started_ray |= started
            with _keep_sigint():
                execute(cfg, run, data, ordered, resume)
        return Run.load(self.storage, self.name)

    def deploy(self) -> Deployment:
        """Serve the run's student (deploy stage); returns once /v2/health/ready answers."""
        summary = self.run(stages=("deploy",)).deploy
        return Deployment(url=summary.url, model=summary.model, version=summary.version, summary=summary)

    def load(self) -> Run:
        """The run as it stands on storage, without running anything."""
        return Run.load(self.storage, self.name)

    def close(self) -> None:
        """Shut down Ray if this Pipeline started it (its deployments go with it)."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _keep_sigint():
    """Ray Train installs its own SIGINT handler during fit() and leaves it; a notebook's
    interrupt must keep working afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
