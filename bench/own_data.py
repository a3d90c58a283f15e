"""Own data: does the default recipe learn from the images users bring?

Three image-folder tasks are generated as a user has them (bench/own_data_tasks.py): PNG and
JPEG files of 24-96 px in grey, RGB, RGBA and palette modes, a few hundred per class, and a
held-out folder of 30 per class that no stage sees:

- shapes: circle / square / triangle on random colours, 150 per class (the smallest);
- stripes: four stripe orientations, 200 per class;
- marks: plus / cross / ring / dot glyphs, 250 per class (--quick: 100 each).

On each, side by side in one run:
- baseline: a plain 3-layer CNN (Adam, 60 epochs, flips only, 32 px), trained on the train
  folder, scored on the held-out folder;
- ours: the whole pipeline with configs/default.yaml, nothing set but data.source (sweep,
  teacher from scratch, student, deploy on a local Ray); the teacher is scored on the held-out
  files in this process, the student through HTTP against its Serve deployment (the files
  uploaded to /predict, as `raydistill query` sends them).
- pretrained: the smallest task again with `teacher.pretrained`. No published weights can be
  downloaded here, so the bench first trains the default teacher on a larger related task
  (shapes6: six shapes, 300 per class; --quick: 150), writes it into a Hugging Face hub cache as the
  repository raydistill-bench/shapes6 and points HF_HUB_CACHE at it (HF_HUB_OFFLINE=1): the
  teacher loads it through the same lookup a cached download takes.

Targets: on every task, our teacher's held-out accuracy >= the baseline's; the served student
keeps >= 95% of its teacher's held-out accuracy; on the smallest task the pretrained teacher
beats its from-scratch self.

    python bench/own_data.py [--quick] [--tasks shapes,stripes,marks] [--keep]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, Bench
from own_data_tasks import baseline_cnn, make_task

PER_CLASS = {"shapes": 150, "stripes": 200, "marks": 250}
PER_CLASS_QUICK = {"shapes": 100, "stripes": 100, "marks": 100}
HELD_OUT = 30
PRETRAIN_TASK, PRETRAIN_PER_CLASS, PRETRAIN_REPO = "shapes6", 300, "raydistill-bench/shapes6"
RETENTION = 0.95


def held_out_files(folder: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    return [(f, label) for label, name in enumerate(class_names) for f in sorted((folder / name).iterdir())]


def teacher_accuracy(run_root: Path, files: list[tuple[Path, int]]) -> float:
    """The trained teacher on the held-out files, decoded as the served model decodes uploads."""
    import numpy as np
    import torch

    from raydistill.artifacts import load_weights
    from raydistill.models import Classifier, ModelSpec, load_network
    from raydistill.serving import decode_upload

    state, meta = load_weights(run_root / "teacher" / "teacher.safetensors")
    spec = ModelSpec.from_meta(meta)
    model = Classifier(load_network(state, meta), spec).eval()
    pixels = np.stack([decode_upload(f.read_bytes(), spec.input_shape, 1 << 24) for f, _ in files])
    with torch.no_grad():
        predicted = model(torch.from_numpy(pixels)).argmax(1).numpy()
    return float((predicted == np.array([y for _, y in files])).mean())


def served_accuracy(url: str, files: list[tuple[Path, int]]) -> float:
    import requests

    right = 0
    for i in range(0, len(files), 64):
        chunk = files[i : i + 64]
        resp = requests.post(f"{url}/predict", files=[("file", (f.name, f.read_bytes())) for f, _ in chunk], timeout=60)
        resp.raise_for_status()
        right += sum(p["label"] == y for p, (_, y) in zip(resp.json()["predictions"], chunk))
    return right / len(files)


def run_pipeline(train_dir: Path, storage: Path, name: str, port: int, sets: list[str] = ()) -> dict:
    """The whole pipeline with configs/default.yaml on `train_dir`; returns its figures (or the
    quality gate's verdict when it stopped the run). The deployment stays up: see summarize."""
    import raydistill
    from raydistill.pipeline import PIPELINE, QualityGateError

    cfg = raydistill.load_config(REPO / "configs" / "default.yaml",
                                 [f"data.source={train_dir}", f"deploy.model_name={name}", f"deploy.port={port}", *sets])
    start = time.perf_counter()
    try:
        raydistill.Pipeline(cfg, storage=storage, name=name).run(stages=PIPELINE)
    except QualityGateError as err:
        return {"stopped": str(err), "seconds": round(time.perf_counter() - start, 1)}
    run = raydistill.Pipeline(cfg, storage=storage, name=name).load()
    figures = {"seconds": round(time.perf_counter() - start, 1), "url": run.deploy.url,
               "teacher": _read(storage / name / "teacher" / "summary.json"),
               "student": _read(storage / name / "student" / "summary.json")}
    return figures


def _read(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def pretrain(work: Path, port: int, quick: bool) -> None:
    """The default teacher trained on shapes6, written into the hub cache work/hub as PRETRAIN_REPO."""
    import raydistill

    train_dir, _, _ = make_task(PRETRAIN_TASK, work / "data", PRETRAIN_PER_CLASS // (2 if quick else 1), HELD_OUT)
    cfg = raydistill.load_config(REPO / "configs" / "default.yaml",
                                 [f"data.source={train_dir}", "sweep.num_trials=0", f"deploy.port={port}"])
    raydistill.Pipeline(cfg, storage=work / "runs", name="pretrain").run(stages=("teacher",))
    cache = work / "hub"
    snapshot = cache / f"models--{PRETRAIN_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    shutil.copyfile(work / "runs" / "pretrain" / "teacher" / "teacher.safetensors", snapshot / "model.safetensors")


def main() -> None:
    bench = Bench("own_data", __doc__, target="teacher held-out >= plain-CNN baseline on every task; served student "
                  f">= {RETENTION:.0%} of its teacher; pretrained teacher > from-scratch on the smallest task",
                  repeats=None)
    bench.parser.add_argument("--tasks", default="shapes,stripes,marks")
    bench.parser.add_argument("--keep", action="store_true", help="keep the generated data and runs")
    args = bench.parse()
    per_class = PER_CLASS_QUICK if args.quick else PER_CLASS
    tasks = args.tasks.split(",")
    smallest = min(tasks, key=lambda t: per_class[t])
    work = Path(tempfile.mkdtemp(prefix="own_data-"))
    # Before Ray starts: its workers inherit the environment (the hub cache the pretrained run reads).
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(work / "hub"))

    import ray

    from raydistill.testing.localcluster import free_ports

    ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=False)
    port = free_ports(1)[0]
    results: dict[str, dict] = {}
    try:
        for task in tasks:
            train_dir, held_dir, names = make_task(task, work / "data", per_class[task], HELD_OUT)
            files = held_out_files(held_dir, names)
            base = baseline_cnn(train_dir, held_dir)
            ours = run_pipeline(train_dir, work / "runs", task, port)
            results[task] = summarize(task, base, ours, work, files)
        pretrain(work, port, args.quick)  # into work/hub, where HF_HUB_CACHE points
        train_dir = work / "data" / smallest / "train"
        files = held_out_files(work / "data" / smallest / "held_out", sorted(p.name for p in train_dir.iterdir()))
        tuned = run_pipeline(train_dir, work / "runs", f"{smallest}-pretrained", port,
                             [f"teacher.pretrained={PRETRAIN_REPO}"])
        results[f"{smallest}-pretrained"] = summarize(f"{smallest}-pretrained", None, tuned, work, files)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)

    scratch, pre = results[smallest], results[f"{smallest}-pretrained"]
    checks = {
        "teacher_at_least_baseline": all(r.get("teacher_held_out", -1) >= r["baseline_held_out"]
                                         for t, r in results.items() if t in tasks),
        "student_retention": all(r.get("student_retention", 0) >= RETENTION for r in results.values()),
        "pretrained_beats_scratch": pre.get("teacher_held_out", -1) > scratch.get("teacher_held_out", 2),
    }
    compare = {}
    for task, r in results.items():
        if r.get("baseline_held_out") is not None:
            compare[f"{task}: plain CNN"] = r["baseline_held_out"]
        compare[f"{task}: teacher"] = r.get("teacher_held_out", 0.0)
        compare[f"{task}: served student"] = r.get("student_held_out", 0.0)
    bench.finish(met=all(checks.values()), figures={**checks, "tasks": results}, compare=compare,
                 unit="held-out accuracy")


def summarize(task: str, base: dict | None, ours: dict, work: Path, files) -> dict:
    row = {"baseline_held_out": base["held_out_accuracy"] if base else None,
           "baseline_s": base["seconds"] if base else None, "pipeline_s": ours["seconds"],
           "held_out_images": len(files)}
    if "stopped" in ours:
        print(f"{task}: the quality gate stopped the run: {ours['stopped']}", file=sys.stderr)
        return {**row, "stopped": ours["stopped"]}
    from ray import serve

    teacher = teacher_accuracy(work / "runs" / task, files)
    student = served_accuracy(ours["url"], files)
    serve.delete(task)  # the next task deploys on the same port and route
    t, s = ours["teacher"], ours["student"]
    row.update(teacher_held_out=teacher, student_held_out=student, student_retention=student / teacher if teacher else 0.0,
               teacher_arch=t["arch"], teacher_epochs=t["epochs"], teacher_val=t["val_accuracy"],
               majority_val=t["majority_val_accuracy"], student_val=s["val_accuracy"], kd_effect=s["kd_effect"])
    print(f"{task}: baseline {row['baseline_held_out']}, teacher {teacher:.3f}, served student {student:.3f} "
          f"({row['pipeline_s']:.0f} s)", file=sys.stderr)
    return row


if __name__ == "__main__":
    main()
