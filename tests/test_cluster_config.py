"""cluster.yaml against Ray's own cluster-launcher checks (the same `prepare_config` +
`validate_config` that `ray up` runs; no cloud account needed), plus what this project relies
on: a CPU-0 head, CPU and GPU worker types, the pinned install, token auth on every node, no
Ray port open to the internet, and the shared storage path the GPU preset names.
"""

from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml

from conftest import REPO
from ray_internals import validated_cluster_config

RAY_PORTS = {6379, 8265, 8000, 10001, 8076}  # GCS, dashboard/Jobs API, Serve, Ray Client, object manager
STORAGE = "/mnt/cluster_storage"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validated(config: dict) -> dict:
    return validated_cluster_config(config)


def test_ray_accepts_the_cluster_config(raw):
    prepared = _validated(raw)
    assert prepared["provider"]["type"] == "aws"
    # prepare_config merged the setup commands into both node kinds (the head adds boto3 for
    # the autoscaler, into the same venv: setup_commands put it first on PATH).
    n = len(raw["setup_commands"])
    assert prepared["head_setup_commands"][:n] == prepared["worker_setup_commands"][:n] == raw["setup_commands"]


@pytest.mark.parametrize("breakage", [
    lambda c: c.update(max_worker=4),                                         # misspelled top-level key
    lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),   # misspelled node-type key
    lambda c: c["available_node_types"]["cpu_worker"].update(max_workers="four"),  # wrong type
    lambda c: c.update(head_node_type="no_such_type"),
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9),  # above the global max_workers
])
def test_ray_rejects_a_broken_cluster_config(raw, breakage):
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validated(broken)


def test_node_types_head_without_work_cpu_and_gpu_workers(raw):
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}  # nothing is scheduled on the head
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith("c")
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "p5.48xlarge"  # 8x H100
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert sum(types[n]["max_workers"] for n in ("cpu_worker", "gpu_worker")) <= raw["max_workers"]
    # The GPU preset's 16 workers fit the GPU node type's maximum (8 GPUs each).
    gpu_preset = yaml.safe_load((REPO / "configs" / "gpu-cluster.yaml").read_text())
    assert gpu_preset["teacher"]["num_workers"] <= 8 * types["gpu_worker"]["max_workers"]


def test_every_node_installs_the_pinned_project(raw):
    setup = " ".join(raw["setup_commands"])
    assert re.search(r"pip install .*-c \S*constraints\.txt -e \S*raydistill", setup)
    assert "~/raydistill" in raw["file_mounts"] and raw["file_mounts"]["~/raydistill"] == "."
    for excluded in (".venv", "runs"):
        assert excluded in raw["rsync_exclude"]


def test_token_auth_on_every_node_and_dashboard_on_loopback(raw):
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    for cmd in starts:
        if " ray start" in cmd or "/ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token, every node


def test_no_ray_port_is_open_to_the_internet(raw):
    # Ray's AWS provider makes the group from its defaults (all traffic between the group's own
    # members, SSH from anywhere) plus these rules; none may open another port to a CIDR.
    for rule in raw["provider"]["security_group"]["IpPermissions"]:
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        if rule.get("IpRanges") or rule.get("Ipv6Ranges"):
            assert ports <= {22}, rule
        assert not ports & RAY_PORTS or not (rule.get("IpRanges") or rule.get("Ipv6Ranges")), rule
    for name, node_type in raw["available_node_types"].items():
        # A group of one's own would replace Ray's; it must then be checked by hand.
        assert "SecurityGroupIds" not in node_type["node_config"], name


def test_shared_storage_matches_the_gpu_preset(raw):
    mounts = " ".join(raw["initialization_commands"])
    assert "mount -t nfs4" in mounts and STORAGE in mounts
    header = (REPO / "configs" / "gpu-cluster.yaml").read_text().split("\nseed:")[0]
    assert f"--storage {STORAGE}/" in header
    assert f"--storage {STORAGE}/" in (REPO / "cluster.yaml").read_text()
