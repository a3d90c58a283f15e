"""Secure by default: the local Ray's dashboard and Jobs API answer on loopback only, and the
repository holds no credentials. (A job submitted without the token is refused:
tests/test_e2e_job.py, against a real `ray start --head`.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from raydistill.testing.secrets_scan import scan_repo, scan_text

from conftest import REPO
from ray_internals import LOCAL_NODE_INFO

# Starts Ray the way `raydistill run` does without a cluster, reports, and waits for stdin.
LOCAL_RAY = """
import json, sys, ray
from raydistill.pipeline import connect_ray
assert connect_ray(), "expected to start a local Ray"
""" + LOCAL_NODE_INFO + """
print(json.dumps(info), flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture
def local_ray():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line, "the local Ray did not start"
        yield proc, json.loads(line)
    finally:
        proc.stdin.close()  # the script shuts its Ray down and exits
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_local_dashboard_and_jobs_api_listen_on_loopback_only(local_ray):
    proc, info = local_ray
    host, port = info["dashboard"].rsplit(":", 1)
    assert host == "127.0.0.1"
    port = int(port)
    pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
    listening = [c.laddr for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.port == port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    # From the machine's network address the port is closed; on loopback the Jobs API answers
    # (and wants the token).
    if info["node_ip"] not in ("127.0.0.1", "::1"):
        with pytest.raises(OSError):
            socket.create_connection((info["node_ip"], port), timeout=5).close()
    import requests

    assert requests.get(f"http://127.0.0.1:{port}/api/jobs/", timeout=30).status_code in (401, 403)


def test_repository_holds_no_key_like_strings():
    assert scan_repo(REPO) == []


@pytest.mark.parametrize("line", [
    "aws_access_key_id = " + "AKIA" + "Q3EGRIUZ7XK5MNTB",
    "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
    "token: " + "gh" + "p_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    'RAY_AUTH_TOKEN="' + "3f9a" * 16 + '"',
    "api_key = '" + "Zx81kQ0pLm4RtY7uWv2sNb6c" + "'",
])
def test_scanner_finds_planted_keys(line):
    assert scan_text(f"# config\n{line}\n")


@pytest.mark.parametrize("line", [
    "sha256: FILL-FROM-MANIFEST", "image: REGISTRY/raydistill:0.1.0", "api_key_env: RAYDISTILL_API_KEY",
    "token = secrets.token_hex(32)", 'RAY_AUTH_TOKEN_PATH: "/tmp/rd-x/auth_token"',
])
def test_scanner_leaves_placeholders_and_code_alone(line):
    assert scan_text(line) == []


def test_cluster_presets_that_listen_beyond_loopback_require_a_key():
    import yaml

    from raydistill.config import load_config

    cluster = load_config(REPO / "configs" / "gpu-cluster.yaml").deploy
    assert cluster.host == "0.0.0.0" and cluster.api_key_file
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    var = serve_config["applications"][0]["args"]["deploy"]["api_key_env"]
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:  # a replica may land on any of them, and reads the key from its own env
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "raydistill-api-key", container["name"]
