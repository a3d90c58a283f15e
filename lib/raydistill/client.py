"""Commands for people at a terminal: `raydistill query` and `raydistill status`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from raydistill.artifacts import STAGES, Run, read_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CHUNK = 64  # files per request


def _image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{raw}: no such file or folder")
    if not files:
        raise ValueError(f"no PNG/JPEG images under {', '.join(paths)}")
    return files


def query(url: str, paths: list[str]) -> int:
    """POST images to /predict and print one row per image."""
    import requests

    files = _image_files(paths)
    rows = []
    for i in range(0, len(files), CHUNK):
        chunk = files[i : i + CHUNK]
        try:
            resp = requests.post(
                f"{url.rstrip('/')}/predict",
                files=[("file", (p.name, p.read_bytes())) for p in chunk],
                timeout=60,
            )
        except requests.ConnectionError:
            raise RuntimeError(f"cannot reach {url}: is the deployment running?") from None
        if resp.status_code != 200:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text
            raise RuntimeError(f"{url}/predict answered {resp.status_code}: {message}")
        rows += zip(chunk, resp.json()["predictions"])
    width = max(len(str(p)) for p, _ in rows)
    print(f"{'image':<{width}}  label  prob    top-3")
    for path, pred in rows:
        top = ", ".join(f"{t['label']}:{t['probability']:.2f}" for t in pred["top_k"])
        print(f"{str(path):<{width}}  {pred['label']:>5}  {pred['probability']:.3f}  {top}")
    return 0


def _when(ts) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _figures(run: Run, stage: str) -> str:
    path = run.root / stage / "summary.json"
    if not path.exists():
        return ""
    s = read_json(path)
    if stage == "data":
        return f"rows {s['rows_read']}, skipped {sum(s['rows_skipped'].values())}, splits {s['splits']}"
    if stage == "sweep":
        return f"best {s['metric']} {s['best_metric']:.4f}, {len(s['trials'])} trials"
    if stage == "teacher":
        return f"{s['arch']} acc {s['accuracy']:.4f}, params/rank {s['params_per_rank']}"
    if stage == "student":
        return f"{s['arch']} acc {s['accuracy']:.4f}, retention {s['retention']:.3f}, {s['params_ratio']:.1f}x smaller"
    if stage == "deploy":
        return f"{s['url']} model {s['model']} v{s['version']}"
    return ""


def status(storage: str, name: str) -> int:
    run = Run(storage, name)
    if not run.manifest_path.exists():
        raise ValueError(f"no run '{name}' under {Path(storage).resolve()}")
    stages = run.manifest().get("stages", {})
    print(f"run {name}  ({run.root})")
    print(f"{'stage':<8} {'status':<12} {'started':<19} {'took':>7}  figures")
    for stage in STAGES:
        rec = stages.get(stage, {})
        took = f"{rec['end'] - rec['start']:.0f}s" if rec.get("end") and rec.get("start") else "-"
        figures = rec.get("error") if rec.get("status") == "failed" else _figures(run, stage)
        print(f"{stage:<8} {rec.get('status', 'pending'):<12} {_when(rec.get('start')):<19} {took:>7}  {figures or ''}")
    return 0
