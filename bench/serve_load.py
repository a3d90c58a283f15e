"""Serving load: raydistill's Serve deployment against a naive one and the bare model.

The model is the student the demo pipeline serves: configs/demo.yaml's `student.arch`
(plain_cnn_s) for the bundled digits, built as the student stage builds it
(distill.student_spec, models.build_network; untrained weights: latency does not depend on
them), exported with compress.export_onnx and quantized to static int8 with
compress.quantize_int8 on 512 training images, as the student stage does. It runs the way
the deploy stage runs it on CPU: in ONNX Runtime through serving.Predictor, the int8 file by
default (what deploy.runtime=auto picks when int8 keeps its validation accuracy; --runtime
onnx serves the fp32 file, torch the PyTorch weights). All three systems run that same
Predictor on one thread:
  (a) bare   the Predictor in this process (batch = concurrency): the limit;
  (b) naive  a Serve deployment with Serve's defaults and one forward per request;
  (c) ours   raydistill.serving.build_app with the demo's deploy settings (@serve.batch,
             max_batch_size, max_ongoing_requests).
Each gets the same Open Inference Protocol v2 JSON request (one 8x8 image) over loopback,
for a fixed number of requests at concurrency 1, 16 and 64; one replica of 1 CPU each,
deployed one at a time on a local Ray of 2 CPUs. Reports req/s, p50, p99 and errors; each
measurement stops starting requests after 15 s (--quick) or 60 s.

Targets on 2 CPU cores: ours at concurrency 1 p50 <= bare + 3 ms; ours at concurrency 64
>= 3x naive throughput; 0 errors.

With --against REF, ours is also measured with the serving code of commit REF (a git
worktree, imported through PYTHONPATH in a child process that runs this same script), the two
interleaved --repeats times, best of each: at every concurrency ours' req/s must be at least
0.95x REF's (no regression beyond 5%), with 0 errors.

    python bench/serve_load.py [--quick] [--runtime int8|onnx|torch] [--against REF [--repeats 2]]
"""

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import Bench, best, interleave, rounded, worktree

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 16, 64)
REPLICA_CPUS = 1.0


def demo_config(port: int):
    from raydistill.config import load_config

    # The demo's deploy settings; one whole CPU per replica so naive and ours get the same.
    return load_config(REPO / "configs" / "demo.yaml", [f"deploy.port={port}", f"deploy.replica_cpus={REPLICA_CPUS}"])


def training_rows(cfg, root: Path):
    """(the data, 512 training images for int8 calibration) as the student stage has them: the
    digits through the data stage, on a local Ray started and shut down here (so none runs
    while the bare model is measured)."""
    from raydistill.data import resolve_source

    source = resolve_source(cfg, root)
    try:
        from raydistill.data import prepare
    except ImportError:  # --against a commit from before the data stage stored its splits
        from raydistill.data import load_dataset

        data = load_dataset(cfg, source)
        return data, data.train.images[:512]
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per execution otherwise
        data = prepare(cfg, source, root / "splits")
    finally:
        ray.shutdown()
    return data, data.train.head(512).images


def student_files(cfg, root: Path, runtime: str):
    """The demo's student as the student stage writes it: safetensors, and the ONNX file the
    runtime needs. Returns (ServedModel, spec, params)."""
    from raydistill import compress
    from raydistill.artifacts import save_weights, sha256
    from raydistill.distill import student_spec
    from raydistill.models import build_network, count_params
    from raydistill.serving import ServedModel

    data, calibration = training_rows(cfg, root)
    spec = student_spec(cfg, data)
    net = build_network(spec).eval()
    weights = save_weights(root / "student.safetensors", net.state_dict(), spec.to_meta())
    onnx = None
    if runtime != "torch":
        onnx = compress.export_onnx(net, spec, root / "student.onnx")
        if runtime == "int8":
            onnx = compress.quantize_int8(onnx, root / "student.int8.onnx", calibration)
    model = ServedModel(str(weights), sha256(weights), *((str(onnx), sha256(onnx)) if onnx else ()))
    return model, spec, count_params(net)


def bare(model, spec, requests_at: dict) -> dict:
    from raydistill.serving import Predictor

    predict = Predictor(model, threads=1)
    rng = np.random.default_rng(0)
    out = {}
    for c, n in requests_at.items():
        x = rng.random((c, *spec.input_shape), dtype=np.float32)
        for _ in range(5):
            predict(x)
        times = []
        for _ in range(max(1, n // c)):
            start = time.perf_counter()
            predict(x)
            times.append(time.perf_counter() - start)
        t = np.asarray(times)
        out[c] = {"rps": c / t.mean(), "p50_ms": 1e3 * np.percentile(t, 50), "p99_ms": 1e3 * np.percentile(t, 99),
                  "errors": 0}
    return out


async def _load(url: str, spec, concurrency: int, total: int, max_s: float) -> dict:
    """`total` requests from `concurrency` clients; none is started after max_s seconds."""
    import aiohttp

    shape = [1, *spec.input_shape]
    body = json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32",
                                   "data": np.random.default_rng(0).random(int(np.prod(shape))).round(4).tolist()}]})
    latencies, errors, sent = [], 0, 0
    stop_at = time.perf_counter() + max_s

    async def client(session):
        nonlocal errors, sent
        while sent < total and time.perf_counter() < stop_at:
            sent += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    t = np.asarray(latencies)
    return {"rps": len(t) / elapsed, "p50_ms": 1e3 * np.percentile(t, 50), "p99_ms": 1e3 * np.percentile(t, 99),
            "errors": errors}


def naive_app(model, name: str, cpus: float):
    """What one writes without raydistill.serving: Serve's defaults, one forward per request."""
    from fastapi import FastAPI, Request
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": cpus})
    @serve.ingress(app)
    class Naive:
        def __init__(self, served):
            from raydistill.serving import Predictor

            self.predict = Predictor(served, threads=1)

        @app.post(f"/v2/models/{name}/infer")
        async def infer(self, request: Request) -> dict:
            tensor = (await request.json())["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            probs = self.predict(x)
            return {"model_name": name, "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel().tolist()}]}

    return Naive.bind(model)


def served(name: str, app, url: str, spec, requests_at: dict, max_s: float) -> dict:
    from ray import serve

    serve.run(app, name=name, route_prefix="/")
    asyncio.run(_load(url, spec, 4, 40, max_s))  # warm-up
    out = {c: asyncio.run(_load(url, spec, c, n, max_s)) for c, n in requests_at.items()}
    serve.delete(name)
    return out


def ours_with(lib: Path, args) -> dict:
    """Ours measured in a child process that imports raydistill from `lib` (this script,
    --ours-only); returns {concurrency: figures}."""
    import os
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "ours.json"
        cmd = [sys.executable, __file__, "--ours-only", "--runtime", args.runtime, "--out", str(record),
               *(["--quick"] if args.quick else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"ours with {lib} failed:\n{out.stderr[-3000:]}")
        ours = json.loads(record.read_text())["results"]["ours"]
    return {int(c.removeprefix("c=")): r for c, r in ours.items()}


def against(bench: Bench, args) -> int:
    """Ours now against ours at commit args.against, interleaved in one run."""
    with worktree(args.against) as (sha, old_lib):
        runs = interleave({"before": lambda: ours_with(old_lib, args), "now": lambda: ours_with(REPO / "lib", args)},
                          args.repeats)
    chosen = {name: {c: best([r[c] for r in rs], "rps") for c in CONCURRENCY} for name, rs in runs.items()}
    ratio = {c: chosen["now"][c]["rps"] / chosen["before"][c]["rps"] for c in CONCURRENCY}
    errors = sum(r[c]["errors"] for rs in runs.values() for r in rs for c in CONCURRENCY)
    print(f"\nours now vs ours at {sha[:12]} (best of {args.repeats}, interleaved):")
    for c in CONCURRENCY:
        print(f"  c={c:<3} {chosen['now'][c]['rps']:>8.1f} vs {chosen['before'][c]['rps']:>8.1f} req/s  "
              f"({ratio[c]:.3f}x)  p50 {chosen['now'][c]['p50_ms']:.2f} vs {chosen['before'][c]['p50_ms']:.2f} ms")
    bench.finish(
        met=min(ratio.values()) >= 0.95 and errors == 0,
        figures={"against": sha, "ratio_rps": {f"c={c}": r for c, r in ratio.items()}, "errors": errors,
                 "best": {n: {f"c={c}": rounded(r, 3) for c, r in by_c.items()} for n, by_c in chosen.items()},
                 "runs_rps": {n: [[round(r[c]["rps"], 1) for c in CONCURRENCY] for r in rs] for n, rs in runs.items()}},
        compare={f"{name}, c={c}": chosen[name][c]["rps"] for c in CONCURRENCY for name in ("before", "now")},
        unit=f"req/s over HTTP (before: {sha[:12]})",
    )
    return 0


def main() -> int:
    bench = Bench("serve_load", __doc__,
                  target="ours c=1 p50 <= bare + 3 ms; ours c=64 >= 3x naive req/s; 0 errors", repeats=(1, 1))
    bench.parser.add_argument("--runtime", choices=("int8", "onnx", "torch"), default="int8",
                              help="what every system runs: the student's int8 ONNX (default), fp32 ONNX, or torch")
    bench.parser.add_argument("--against", metavar="REF",
                              help="also measure ours at commit REF, interleaved: no regression beyond 5%%")
    bench.parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    args = bench.parse()
    if args.against:
        bench.name, bench.target = "serve_load_regression", "ours >= 0.95x req/s of ours at REF, every concurrency"
        return against(bench, args)
    requests_at = {1: 200, 16: 600, 64: 1200} if args.quick else {1: 1000, 16: 3000, 64: 6000}
    max_s = 15.0 if args.quick else 60.0  # per measurement: a collapsing baseline must not stall the run

    import ray
    from ray import serve

    from raydistill.serving import build_app

    try:
        from raydistill.testing.localcluster import free_ports
    except ImportError:  # --against a commit from before raydistill.testing
        from raydistill.localcluster import free_ports

    (port,) = free_ports(1)
    cfg = demo_config(port)
    dcfg = cfg.deploy
    url = f"http://127.0.0.1:{port}/v2/models/{dcfg.model_name}/infer"
    with tempfile.TemporaryDirectory() as tmp:
        model, spec, params = student_files(cfg, Path(tmp), args.runtime)
        results = {} if args.ours_only else {"bare": bare(model, spec, requests_at)}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            if not args.ours_only:
                results["naive"] = served("naive", naive_app(model, dcfg.model_name, REPLICA_CPUS), url, spec,
                                          requests_at, max_s)
            results["ours"] = served("ours", build_app(model, dcfg, "bench"), url, spec, requests_at, max_s)
        finally:
            serve.shutdown()
            ray.shutdown()

    if args.ours_only:  # a child of --against: the record is all the parent needs
        bench.finish(met=True, figures={"results": {"ours": {f"c={c}": r for c, r in results["ours"].items()}}})
        return 0
    print(f"\n{spec.arch} ({params:,} params, input {'x'.join(map(str, spec.input_shape))}), runtime {args.runtime}; "
          f"ours: max_batch_size {dcfg.max_batch_size}, max_ongoing_requests {dcfg.max_ongoing_requests}")
    print(f"\n{'system':<7} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for system, by_c in results.items():
        for c, r in by_c.items():
            print(f"{system:<7} {c:>5} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7}")
    ours, naive, limit = results["ours"], results["naive"], results["bare"]
    p50_gap = ours[1]["p50_ms"] - limit[1]["p50_ms"]
    speedup = ours[64]["rps"] / naive[64]["rps"]
    errors = sum(r["errors"] for system in ("naive", "ours") for r in results[system].values())
    print(f"\nours c=1 p50 - bare p50 = {p50_gap:.2f} ms (target <= 3); ours/naive req/s at c=64 = {speedup:.2f}x "
          f"(target >= 3); errors {errors} (target 0)")
    bench.finish(
        met=p50_gap <= 3.0 and speedup >= 3.0 and errors == 0,
        figures={"p50_gap_ms": p50_gap, "speedup_c64": speedup, "errors": errors,
                 "model": {"arch": spec.arch, "params": params, "runtime": args.runtime},
                 "ours_deploy": {"max_batch_size": dcfg.max_batch_size,
                                 "max_ongoing_requests": dcfg.max_ongoing_requests, "replica_cpus": REPLICA_CPUS},
                 "results": {s: {f"c={c}": r for c, r in by_c.items()} for s, by_c in rounded(results, 3).items()}},
        # over HTTP only: the bare forward's figures (tens of thousands) are in `results`
        compare={f"{s}, c={c}": results[s][c]["rps"] for c in CONCURRENCY for s in ("naive", "ours")},
        unit="req/s over HTTP, one image a request",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
