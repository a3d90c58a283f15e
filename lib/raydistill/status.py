"""`raydistill status NAME`: one line per stage from manifest.json and the stage summaries.

Works on a run that is still going (a running stage shows how long it has been running and,
for the teacher, the step of its latest checkpoint), on a failed one (the error), and on a
finished one (each stage's key figures). It reads files only: no Ray, no cluster needed, so
it also answers for a run on shared storage while the job runs elsewhere.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from raydistill.artifacts import STAGES, Run

WIDTH = {"stage": 8, "status": 11, "started": 19, "took": 9}


def _when(ts) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _params(n) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def latest_checkpoint_step(stage_dir: Path) -> int | None:
    """Step of the newest sharded checkpoint Ray Train has written for this stage, if any."""
    steps = [_read(p).get("step") for p in stage_dir.glob("ray/*/checkpoint_*/state.json")]
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def _figures(stage: str, s: dict) -> str:
    """The few numbers a person looks for first; a missing key leaves its part out."""
    parts: list[str] = []

    def add(fmt: str, *keys):
        if all(s.get(k) is not None for k in keys):
            parts.append(fmt.format(*(s[k] for k in keys)))

    if stage == "data":
        add("{} rows", "rows_read")
        if "rows_skipped" in s:
            parts.append(f"skipped {sum(s['rows_skipped'].values()) or 'none'}")
        splits = s.get("splits")
        if isinstance(splits, dict):
            parts.append("train/val/test " + "/".join(str(v) for v in splits.values()))
    elif stage == "sweep":
        add("best {} {:.4f}", "metric", "best_metric")
        if "trials" in s:
            parts.append(f"{len(s['trials'])} trials ({s.get('searcher', '?')}, {s.get('scheduler', '?')})")
        if s.get("best_config"):
            parts.append(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in s["best_config"].items()))
    elif stage == "teacher":
        if s.get("params_total") is not None:
            parts.append(f"{s.get('arch', '?')} {_params(s['params_total'])}")
        add("ZeRO-{} x{}", "zero_stage", "world_size")
        add("acc {:.4f}", "accuracy")
        add("{} steps", "steps")
        add("{:.0f} samples/s", "samples_per_s")
        add("restarts {}", "restarts")
        if s.get("resumes"):
            parts.append(f"resumed {s['resumes']}x from step {s.get('resumed_from_step')}")
    elif stage == "student":
        if s.get("params_total") is not None:
            parts.append(f"{s.get('arch', '?')} {_params(s['params_total'])}")
        add("acc {:.4f}", "accuracy")
        add("retention {:.3f}", "retention")
        add("int8 acc {:.4f}", "int8_accuracy")
        add("{:.1f}x smaller", "params_ratio")
        lat = s.get("latency_ms_p50") or {}
        if "student" in lat:
            parts.append(f"p50 {lat['student']:.2f} ms (teacher {lat.get('teacher', float('nan')):.2f})")
    elif stage == "deploy":
        add("{}", "url")
        add("model {}", "model")
        add("version {}", "version")
        add("{} replicas", "replicas")
        add("runtime {}", "runtime")
    return ", ".join(parts)


def _progress(run: Run, stage: str) -> str:
    if stage in ("teacher", "student"):
        step = latest_checkpoint_step(run.root / stage)
        if step is not None:
            return f"latest checkpoint at step {step}"
    return ""


def stage_rows(run: Run, now: float | None = None) -> list[dict]:
    """One dict per stage: stage, status, started, took, figures (strings)."""
    now = time.time() if now is None else now
    stages = run.manifest().get("stages", {})
    rows = []
    for stage in STAGES:
        rec = stages.get(stage, {})
        status = rec.get("status", "pending")
        start, end = rec.get("start"), rec.get("end")
        if start and end:
            took = _duration(end - start)
        elif start and status == "running":
            took = _duration(now - start) + "+"  # still going
        else:
            took = "-"
        if status in ("failed", "interrupted"):
            figures = rec.get("error") or ""
        elif status == "running":
            figures = _progress(run, stage)
        else:
            figures = _figures(stage, _read(run.root / stage / "summary.json"))
        rows.append({"stage": stage, "status": status, "started": _when(start), "took": took, "figures": figures})
    return rows


def render(run: Run, now: float | None = None) -> str:
    manifest = run.manifest()
    versions = manifest.get("packages", {})
    lines = [f"run {run.name}  ({run.root})"]
    facts = [f"config {manifest['config_hash']}" if manifest.get("config_hash") else "",
             f"git {manifest['git_sha'][:12]}" if manifest.get("git_sha") else "",
             " ".join(f"{k} {versions[k]}" for k in ("ray", "torch", "deepspeed") if k in versions)]
    if any(facts):
        lines.append("  ".join(f for f in facts if f))
    header = {k: k for k in (*WIDTH, "figures")}
    rows = [header, *stage_rows(run, now)]
    for row in rows:
        lines.append(f"{row['stage']:<{WIDTH['stage']}} {row['status']:<{WIDTH['status']}} "
                     f"{row['started']:<{WIDTH['started']}} {row['took']:>{WIDTH['took']}}  {row['figures']}".rstrip())
    return "\n".join(lines)


def as_dict(run: Run) -> dict:
    """The manifest with each stage's summary beside its record: what `status --json` prints."""
    manifest = run.manifest()
    records = manifest.get("stages", {})
    stages = {}
    for stage in STAGES:
        summary_path = run.root / stage / "summary.json"
        stages[stage] = {**records.get(stage, {"status": "pending"}),
                         "summary": _read(summary_path) if summary_path.exists() else None}
    return {**{k: v for k, v in manifest.items() if k != "stages"}, "root": str(run.root), "stages": stages}


def status(storage: str, name: str, as_json: bool = False) -> int:
    run = Run(storage, name)
    if not run.manifest_path.exists():
        raise ValueError(f"no run '{name}' under {Path(storage).expanduser().resolve()} (no manifest.json)")
    print(json.dumps(as_dict(run), indent=2, default=str) if as_json else render(run))
    return 0
