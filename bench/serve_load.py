"""Serving load benchmark: raydistill's Serve deployment against a naive one and the bare model.

Compared in one run, with the same student weights and the same Open Inference Protocol v2 JSON
request (one 8x8 image), over loopback, for a fixed number of requests at concurrency 1, 16, 64:
  (a) bare   the model's forward in this process (batch = concurrency): the limit
  (b) naive  a Serve deployment with Serve's defaults and one forward per request
  (c) ours   raydistill.serving (@serve.batch, config-driven max_ongoing_requests)
One replica each, the same CPUs, deployed one at a time. Reports req/s, p50, p99 and errors;
each measurement stops starting requests after 15 s (--quick) or 60 s.
Targets on 2 CPU cores: ours at concurrency 1 p50 <= bare + 3 ms; ours at concurrency 64
>= 3x naive throughput; 0 errors.

    python bench/serve_load.py [--quick]
"""

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_weights(root: Path):
    from raydistill.artifacts import save_weights, sha256
    from raydistill.models import ModelSpec, build_network

    spec = ModelSpec("test_efficientnet", 10, (1, 8, 8), 16)
    path = save_weights(root / "student.safetensors", build_network(spec).state_dict(), spec.to_meta())
    return spec, str(path), sha256(path)


def bare(spec, path, requests_at: dict) -> dict:
    import torch

    from raydistill.artifacts import load_weights
    from raydistill.models import Classifier, build_network

    torch.set_num_threads(1)
    state, _ = load_weights(Path(path))
    net = build_network(spec)
    net.load_state_dict(state)
    model = Classifier(net, spec).eval()
    out = {}
    with torch.inference_mode():
        for c, n in requests_at.items():
            x = torch.rand(c, *spec.input_shape)
            for _ in range(5):
                model(x)
            times = []
            for _ in range(max(1, n // c)):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
            t = np.asarray(times)
            out[c] = {"rps": c / t.mean(), "p50_ms": 1e3 * np.percentile(t, 50), "p99_ms": 1e3 * np.percentile(t, 99),
                      "errors": 0}
    return out


async def _load(url: str, concurrency: int, total: int, max_s: float) -> dict:
    """`total` requests from `concurrency` clients; none is started after max_s seconds."""
    import aiohttp

    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": np.random.default_rng(0).random(64).round(4).tolist()}]})
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


def naive_app(path: str, cpus: float):
    from fastapi import FastAPI, Request
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": cpus})
    @serve.ingress(app)
    class Naive:
        def __init__(self, weights: str):
            import torch

            from raydistill.artifacts import load_weights
            from raydistill.models import Classifier, ModelSpec, build_network

            torch.set_num_threads(1)
            state, meta = load_weights(Path(weights))
            spec = ModelSpec.from_meta(meta)
            net = build_network(spec)
            net.load_state_dict(state)
            self.model = Classifier(net, spec).eval()

        @app.post("/v2/models/digits/infer")
        async def infer(self, request: Request) -> dict:
            import torch

            tensor = (await request.json())["inputs"][0]
            x = torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])
            with torch.inference_mode():
                probs = torch.softmax(self.model(x), -1).numpy()
            return {"model_name": "digits", "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel().tolist()}]}

    return Naive.bind(path)


def served(name: str, app, port: int, requests_at: dict, max_s: float) -> dict:
    from ray import serve

    serve.run(app, name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
    asyncio.run(_load(url, 4, 40, max_s))  # warm-up
    out = {c: asyncio.run(_load(url, c, n, max_s)) for c, n in requests_at.items()}
    serve.delete(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: a minute or two on 2 cores")
    args = parser.parse_args()
    requests_at = {1: 200, 16: 600, 64: 1200} if args.quick else {1: 1000, 16: 3000, 64: 6000}
    max_s = 15.0 if args.quick else 60.0  # per measurement: a collapsing baseline must not stall the run

    import ray
    from ray import serve

    from raydistill.config import DeployConfig
    from raydistill.serving import ServedModel, build_app

    cpus = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        spec, path, digest = make_weights(Path(tmp))
        results = {"bare": bare(spec, path, requests_at)}
        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            results["naive"] = served("naive", naive_app(path, cpus), port, requests_at, max_s)
            ours = DeployConfig(port=port, replica_cpus=cpus, max_batch_size=32, max_ongoing_requests=128)
            results["ours"] = served("ours", build_app(ServedModel(path, digest), ours, "bench"), port, requests_at, max_s)
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"\n{'system':<7} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for system, by_c in results.items():
        for c, r in by_c.items():
            print(f"{system:<7} {c:>5} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7}")
    ours, naive, limit = results["ours"], results["naive"], results["bare"]
    p50_gap = ours[1]["p50_ms"] - limit[1]["p50_ms"]
    speedup = ours[64]["rps"] / naive[64]["rps"]
    errors = sum(r["errors"] for system in ("naive", "ours") for r in results[system].values())
    met = p50_gap <= 3.0 and speedup >= 3.0 and errors == 0
    print(f"\nours c=1 p50 - bare p50 = {p50_gap:.2f} ms (target <= 3); ours/naive req/s at c=64 = {speedup:.2f}x "
          f"(target >= 3); errors {errors} (target 0)")
    print(json.dumps({
        "bench": "serve_load",
        "target": "ours c=1 p50 <= bare + 3 ms; ours c=64 >= 3x naive req/s; 0 errors",
        "met": bool(met), "p50_gap_ms": round(p50_gap, 3), "speedup_c64": round(speedup, 3), "errors": errors,
        "results": {s: {str(c): {k: round(v, 3) for k, v in r.items()} for c, r in by_c.items()}
                    for s, by_c in results.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
