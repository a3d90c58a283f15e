"""Serving under generated and hostile input: no request may get a 5xx or take the replica down.

The demo's student (as bench/serve_load.py builds it: plain_cnn_s, int8 ONNX) is deployed with
raydistill.serving on a local Ray, then:
  - schemathesis generates requests for every operation in the deployment's /openapi.json,
    --cases per operation that takes input (500; 100 with --quick; the path parameters name the
    served model, so bodies reach the decoders), each checked for "not a server error";
  - the hostile requests of tests/test_serving.py (decompression bombs, 200k-deep JSON,
    overflowing shapes and values, floods past each limit, ...) are sent once each;
and after each operation the replica must still answer /v2/health/ready. The baseline is the
requirement itself: 0 responses of 5xx, whatever is sent.

    python bench/serve_fuzz.py [--quick] [--cases 500]
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, Bench

sys.path.insert(0, str(REPO / "tests"))  # the hostile requests are the tests' own


def fuzz(url: str, cases: int, model: str, version: str) -> dict:
    """Per operation: how many cases ran and their status codes. Path parameters name the
    served model and version, so generated bodies get past the 404 and into the decoders."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    results = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        codes: collections.Counter = collections.Counter()
        failures: list[str] = []

        @given(case=operation.as_strategy())
        @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            known = {"name": model, "version": version}
            case.path_parameters = {k: known.get(k, v) for k, v in (case.path_parameters or {}).items()}
            response = case.call(timeout=30)
            codes[response.status_code] += 1
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except Exception as err:  # a 5xx: counted and shown, the run goes on
                failures.append(f"{response.status_code} {str(err)[:200]}")

        start = time.perf_counter()
        check()
        ready = requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
        name = f"{operation.method.upper()} {operation.path}"
        results[name] = {"cases": sum(codes.values()), "codes": {str(k): v for k, v in sorted(codes.items())},
                         "server_errors": sum(v for k, v in codes.items() if k >= 500), "ready_after": ready,
                         "seconds": round(time.perf_counter() - start, 1), "failures": failures[:5]}
        print(f"{name:<55} {results[name]['cases']:>5} cases  {results[name]['codes']}  ready={ready}", flush=True)
    return results


def hostile(url: str) -> dict:
    import requests
    from test_serving import HOSTILE

    out = {}
    for case, (path, kwargs, status) in HOSTILE.items():
        resp = requests.post(f"{url}{path}", timeout=60, **kwargs)
        ready = requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
        out[case] = {"status": resp.status_code, "expected": status, "ready_after": ready}
        print(f"{case:<40} {resp.status_code} (expected {status}) ready={ready}", flush=True)
    return out


def main() -> int:
    bench = Bench("serve_fuzz", __doc__, target="0 server errors over >= 500 generated cases per operation that takes input, and "
                  "every hostile request; the replica ready after each", repeats=None)
    bench.parser.add_argument("--cases", type=int, default=None, help="cases per operation (500; 100 with --quick)")
    args = bench.parse()
    cases = args.cases or (100 if args.quick else 500)

    import ray
    from ray import serve
    from serve_load import demo_config, student_files

    from raydistill.serving import build_app
    from raydistill.testing.localcluster import free_ports
    from test_serving import MAX_BYTES, MAX_PIXELS

    (port,) = free_ports(1)
    cfg = demo_config(port)
    # The hostile cases are written against the test deployment's limits.
    dcfg = cfg.deploy.model_copy(update={"max_request_images": 8, "max_request_bytes": MAX_BYTES,
                                         "max_image_pixels": MAX_PIXELS, "replica_cpus": 0.5})
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        model, spec, _ = student_files(cfg, Path(tmp), "int8")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(model, dcfg, "bench"), name=dcfg.model_name, route_prefix="/")
            generated = fuzz(url, cases, dcfg.model_name, "bench")
            attacks = hostile(url)
        finally:
            serve.shutdown()
            ray.shutdown()

    server_errors = sum(r["server_errors"] for r in generated.values())
    # An operation with no parameters and no body has one possible request: hypothesis sends it once.
    fewest = min(r["cases"] for name, r in generated.items() if "{" in name or name.startswith("POST"))
    wrong = sorted(case for case, r in attacks.items() if r["status"] != r["expected"] or not r["ready_after"])
    always_ready = all(r["ready_after"] for r in generated.values())
    print(f"\n{len(generated)} operations, fewest cases {fewest}, server errors {server_errors}; hostile requests "
          f"answered as expected {len(attacks) - len(wrong)}/{len(attacks)}")
    bench.finish(
        met=server_errors == 0 and fewest >= cases and not wrong and always_ready,
        figures={"operations": len(generated), "cases_per_operation": cases, "fewest_cases": fewest,
                 "server_errors": server_errors, "hostile_requests": len(attacks), "hostile_unexpected": wrong,
                 "replica_ready_throughout": always_ready, "generated": generated, "hostile": attacks},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
