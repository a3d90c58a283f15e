"""The whole pipeline on a GPU node, submitted as a user would, then HTTP load on its GPU replica.

A real Ray head (`ray start`, token auth) on this machine; `ray job submit` of jobs/pipeline.py
on the demo preset with every GPU path on:
  - sweep:   Tune trials that are 1-worker Ray Train runs on the GPU (sweep.trial_workers=1);
  - teacher: Ray Train over NCCL, DeepSpeed ZeRO-3 in bf16;
  - student: distilled on the GPU (online teacher on the same GPU);
  - deploy:  the replica holds the GPU (deploy.use_gpu, runtime torch).
The job leaves the deployment up (deploy.foreground=never); this script then sends Open
Inference Protocol v2 requests over loopback at concurrency 1, 16 and 64 for --seconds each,
checks the served predictions on the last 256 digits, and stops the cluster.

Target: the job succeeds; the GPU replica's top-1 accuracy on the last 256 digits >= 0.95;
0 errors under load at every concurrency.

    python bench/gpu_pipeline.py [--quick] [--seconds 10] [--trials 2] [--timeout 600] [--cpu]
--quick: no sweep, 5 s of load per concurrency. --cpu runs the same with the GPU settings off
(a dry run on a machine without one), whose record goes to runs/bench/gpu_pipeline.cpu.json
unless --out says otherwise.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from harness import Bench

REPO = Path(__file__).resolve().parents[1]
MIN_ACCURACY = 0.95
CONCURRENCY = (1, 16, 64)
GPU_SETS = ["teacher.use_gpu=true", "teacher.precision=bf16", "student.use_gpu=true", "deploy.use_gpu=true",
            "deploy.runtime=torch", "sweep.trial_workers=1"]
SETS = ["teacher.num_workers=1", "student.num_workers=1", "deploy.foreground=never"]


def load(url: str, body: dict, concurrency: int, seconds: float) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request on the last answer."""
    import requests

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client():
        session = requests.Session()
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            ok = session.post(url, json=body, timeout=30).status_code == 200
            with lock:
                if ok:
                    latencies.append((time.perf_counter() - start) * 1e3)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors[0],
            "req_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else None}


def served_accuracy(base: str) -> float:
    """The deployment's top-1 accuracy on the last 256 digits, sent as one v2 request."""
    import requests
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[-256:] / 16.0).astype(np.float32)[:, None]
    body = {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32",
                        "data": pixels.ravel().tolist()}]}
    resp = requests.post(f"{base}/v2/models/digits/infer", json=body, timeout=60)
    resp.raise_for_status()
    out = next(o for o in resp.json()["outputs"] if o["datatype"] == "FP32")  # the probabilities
    probs = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    return float((probs.argmax(1) == digits.target[-256:]).mean())


def main() -> None:
    bench = Bench("gpu_pipeline", __doc__, repeats=None,
                  target=f"the job succeeds on the GPU; served top-1 on the last 256 digits >= {MIN_ACCURACY}; "
                         "0 errors under load at concurrency 1, 16, 64")
    parser = bench.parser
    parser.add_argument("--seconds", type=float, default=10.0, help="load per concurrency level (5 with --quick)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the job may take")
    parser.add_argument("--trials", type=int, default=2, help="sweep trials (0 skips the sweep; 0 with --quick)")
    parser.add_argument("--cpu", action="store_true", help="GPU settings off: a dry run without a GPU")
    args = bench.parse()
    if args.quick:
        args.trials, args.seconds = 0, 5.0
    if args.cpu and args.out is None:  # a dry run's record must not replace a GPU run's
        args.out = REPO / "runs" / "bench" / "gpu_pipeline.cpu.json"

    import torch

    from raydistill.testing.localcluster import LocalCluster, free_ports

    if not (args.cpu or torch.cuda.is_available()):
        print("no GPU here: nothing to measure (--cpu runs the same job with the GPU settings off)")
        return

    root = Path(tempfile.mkdtemp(prefix="rdgpu-", dir="/tmp"))
    storage = root / "runs"
    (port,) = free_ports(1)
    sets = [*SETS, f"sweep.num_trials={args.trials}", f"deploy.port={port}", *([] if args.cpu else GPU_SETS)]
    job = ["python", "jobs/pipeline.py", "--config", "configs/demo.yaml", "--storage", str(storage), "--name", "gpu"]
    for item in sets:
        job += ["--set", item]
    result: dict = {"sets": sets}
    with LocalCluster(root / "c", head_cpus=os.cpu_count() or 2) as cluster:
        start = time.perf_counter()
        cluster.submit("gpu-pipeline", job, cwd=REPO)
        status = "PENDING"
        while status in ("PENDING", "RUNNING") and time.perf_counter() - start < args.timeout:
            time.sleep(5)
            status = cluster.job_status("gpu-pipeline")
        result["job"] = {"status": status, "wall_s": round(time.perf_counter() - start, 1)}
        logs = cluster.ray("job", "logs", "gpu-pipeline", check=False).stdout
        (root / "job.log").write_text(logs)
        result["job_log"] = str(root / "job.log")
        print(logs[-6000:], flush=True)
        if status != "SUCCEEDED":
            why = f"the job ended {status} after {result['job']['wall_s']}s (log: {root / 'job.log'})"
            bench.finish(met=False, figures=result, notes=why)
            raise SystemExit(why)
        run = storage / "gpu"
        summaries = {s: json.loads((run / s / "summary.json").read_text()) for s in ("teacher", "student", "deploy")}
        if args.trials:
            sweep = json.loads((run / "sweep" / "summary.json").read_text())
            result["sweep"] = {"trials": len(sweep.get("trials", [])), "best": sweep.get("best_metric")}
        teacher, student = summaries["teacher"], summaries["student"]
        result["teacher"] = {k: teacher.get(k) for k in ("arch", "precision", "zero_stage", "world_size", "steps", "accuracy",
                                                           "samples_per_s", "train_time_s", "export_check")}
        result["student"] = {k: student.get(k) for k in ("arch", "accuracy", "retention", "int8_accuracy", "samples_per_s",
                                                           "train_time_s")}
        deploy = summaries["deploy"]
        result["deploy"] = {k: deploy.get(k) for k in ("url", "runtime", "replicas")}
        base = deploy["url"].rstrip("/")
        result["served_accuracy_last256"] = served_accuracy(base)
        one = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                           "data": np.random.default_rng(0).random(64).tolist()}]}
        result["load"] = {f"c={c}": load(f"{base}/v2/models/digits/infer", one, c, args.seconds) for c in CONCURRENCY}
    print(f"\njob {result['job']['status']} in {result['job']['wall_s']}s; teacher {result['teacher']['precision']} "
          f"acc {result['teacher']['accuracy']:.3f} at {result['teacher']['samples_per_s']:.0f} samples/s; student acc "
          f"{result['student']['accuracy']:.3f}; served ({result['deploy']['runtime']}) acc {result['served_accuracy_last256']:.3f}")
    for row in result["load"].values():
        print(f"  concurrency {row['concurrency']:>3}: {row['req_per_s']:7.1f} req/s  p50 {row['p50_ms'] or float('nan'):6.1f} ms  "
              f"p99 {row['p99_ms'] or float('nan'):6.1f} ms  errors {row['errors']}")
    errors = sum(row["errors"] for row in result["load"].values())
    bench.finish(
        met=result["served_accuracy_last256"] >= MIN_ACCURACY and errors == 0,
        figures={**result, "errors": errors},
        compare={f"ours ({result['deploy']['runtime']}), {c}": row["req_per_s"] for c, row in result["load"].items()},
        unit="req/s, one image a request",
        notes="A CPU dry run (--cpu): GPU settings off." if args.cpu else "",
    )


if __name__ == "__main__":
    main()
