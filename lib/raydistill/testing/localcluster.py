"""A real multi-process Ray cluster on this machine, for end-to-end tests and benchmarks.

Each node is its own `ray start --block` (a head, then any number of worker nodes), with its
own temp dir and free ports, so several clusters (other people's included) can share one
machine. Token authentication is on with a fresh token; the dashboard and Jobs API listen on
127.0.0.1. Nothing here ever runs `ray stop` (it would stop every Ray on the machine): each
node is stopped through its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's `ray` and `python`

# Env for every node. Few idle workers per node: on a 2-core machine, cold-starting one Python
# worker per CPU slot (Ray's default pool) costs more than the work itself. No drain on SIGTERM
# (Ray's default waits up to 30 s for Serve replicas to migrate): these clusters are stopped
# whole, with nowhere to migrate to.
NODE_ENV = {"RAY_num_workers_soft_limit": "4", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# The GCS probes each raylet every second instead of every 3 s, so a lost node is declared dead
# after ~5 failed probes (~5 s, not ~15 s). The probe timeout stays at Ray's default: a node
# that is merely slow on a loaded machine must not be declared dead.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000"}
# Per node: the digits and a few checkpoints need little, and /dev/shm is shared with others.
OBJECT_STORE_BYTES = 512 * 1024**2


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Node:
    """One `ray start --block` process and the Ray processes it owns (raylet, agents, workers)."""

    def __init__(self, name: str, args: list[str], env: dict, root: Path):
        self.name, self.root = name, root
        self.log_path = root / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def processes(self):
        """This node's Ray processes (psutil), the `ray start` process excluded."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def pids_named(self, prefix: str) -> list[int]:
        """Pids of this node's processes whose command line starts with `prefix`
        (workers rename themselves, e.g. `ray::RayTrainWorker`)."""
        import psutil

        found = []
        for proc in self.processes():
            try:
                cmd = proc.cmdline()
                if (cmd and cmd[0].startswith(prefix)) or proc.name() == prefix:
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found

    def workers_named(self, prefix: str) -> list[int]:
        """Pids of the Ray workers (the raylet's own children) named `prefix`, e.g.
        `ray::RayTrainWorker`. Processes a worker forks carry its title too: they are not counted."""
        import psutil

        try:
            raylet = psutil.Process(self.raylet_pid())
            children = raylet.children()
        except (psutil.Error, RuntimeError):
            return []
        found = []
        for proc in children:
            try:
                if " ".join(proc.cmdline()[:1]).startswith(prefix):
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found

    def raylet_pid(self) -> int:
        pids = self.pids_named("raylet")
        if len(pids) != 1:
            raise RuntimeError(f"node {self.name}: expected one raylet, found {pids}")
        return pids[0]

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet: the node is lost as if its machine died (`ray start
        --block` then kills the node's other processes and exits)."""
        pid = self.raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self, timeout_s: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops this node's processes
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""


class DetachedHead(Node):
    """A head started without `--block`, so that one of its processes (the GCS) can die and be
    started again, as a supervisor would, without `ray start --block` tearing the node down
    (it kills every other process once one exits). Its processes are found by the temp dir
    their command lines name, and their children (workers rename themselves)."""

    def __init__(self, name: str, args: list[str], env: dict, root: Path):
        self.name, self.root, self.proc = name, root, None
        self.log_path = root / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.temp_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--temp-dir="))
        try:
            out = subprocess.run([str(BIN / "ray"), "start", *args], env=env, stdout=self._log,
                                 stderr=subprocess.STDOUT, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"ray start of {name} failed: {self.tail()}")
        except BaseException:
            self.stop()  # whatever it started before failing
            raise

    def alive(self) -> bool:
        return bool(self.pids_named("raylet"))

    def processes(self):
        import psutil

        found = {}
        for proc in psutil.process_iter(["cmdline"]):
            if self.temp_dir in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                with contextlib.suppress(psutil.Error):
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        return list(found.values())

    def stop(self, timeout_s: float = 30) -> None:
        import psutil

        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self._log.close()


class LocalCluster:
    """A head (`head_cpus` CPUs) plus worker nodes added with `add_node`.

    `env` is what a client needs to talk to it (token, RAY_AUTH_MODE, this venv on PATH);
    `address` is the Jobs API URL, `gcs_address` what RAY_ADDRESS takes.
    """

    def __init__(self, root: Path, head_cpus: float = 2, extra_env: dict | None = None,
                 detached_head: bool = False):
        self.root = Path(root)  # keep it short: Ray's unix socket paths are bounded (~107 chars)
        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # a job's `python` is this venv's
        }
        self.env.pop("RAY_ADDRESS", None)
        self.node_env = {**self.env, **NODE_ENV, **FAST_NODE_DEATH, **(extra_env or {})}
        gcs, self.dashboard_port, client, self.serve_port = free_ports(4)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.nodes: list[Node] = []
        self.head = self._start("head", head_cpus, detached=detached_head, args=[
            "--head", f"--port={gcs}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--ray-client-server-port={client}",
        ])
        try:
            self._wait_jobs_api()
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, cpus: float, args: list[str], detached: bool = False) -> Node:
        agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(6)
        node = (DetachedHead if detached else Node)(name, [
            *args, f"--num-cpus={cpus}", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / name}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
        ], self.node_env, self.root)
        self.nodes.append(node)
        return node

    def add_node(self, num_cpus: float = 1, attempts: int = 3) -> Node:
        """Start a worker node that joins this cluster; return once the cluster counts it alive.

        On a loaded machine `ray start` can give up registering (it waits 30 s, hard-coded);
        then another node is started, as an autoscaler would replace a node that failed to boot.
        """
        expected = len(self.alive_nodes()) + 1
        for attempt in range(1, attempts + 1):
            node = self._start(f"node{len(self.nodes)}", num_cpus, [f"--address={self.gcs_address}"])
            try:
                self.wait_for_nodes(expected, starting=node)
                return node
            except RuntimeError:
                node.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def ray(self, *args: str, env: dict | None = None, check: bool = True, timeout: float = 900,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """`ray <group> <command> --address <this cluster's Jobs API> args...`"""
        group, command, *rest = args
        out = subprocess.run([str(BIN / "ray"), group, command, "--address", self.address, *rest],
                             env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and out.returncode != 0:
            head = "" if self.head.alive() else f"\nthe head has exited:\n{self.head.tail()}"
            raise RuntimeError(f"ray {group} {command} failed:\n{out.stdout[-4000:]}{out.stderr[-4000:]}{head}")
        return out

    def submit(self, job_id: str, entrypoint: list[str], cwd: Path, wait: bool = False) -> subprocess.CompletedProcess:
        """`ray job submit` of `entrypoint` from `cwd` (uploaded, minus runtime_env.yaml's
        excludes), as a user would; the driver claims no CPU, so it never takes a trainer's."""
        return self.ray("job", "submit", *([] if wait else ["--no-wait"]), "--submission-id", job_id,
                        "--working-dir", ".", "--runtime-env", "runtime_env.yaml", "--entrypoint-num-cpus", "0",
                        "--", *entrypoint, cwd=cwd)

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        out = self.ray("job", "status", job_id, timeout=120).stdout
        # A running job: "Status for job 'ID': RUNNING"; an ended one: "Job 'ID' succeeded"
        # (or "failed"), and a stopped one "Job 'ID' was stopped".
        match = re.search(r"Status for job '[^']+': (\w+)|Job '[^']+' (?:was )?(succeeded|failed|stopped)", out)
        if not match:
            raise RuntimeError(f"unexpected `ray job status` output: {out[-500:]}")
        return (match.group(1) or match.group(2)).upper()

    def alive_nodes(self, retry_s: float = 90) -> list[dict]:
        """The cluster's live nodes, as the state API lists them. The API comes up a little after
        the Jobs API and answers slowly on a loaded machine: failures are retried for `retry_s`."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                out = self.ray("list", "nodes", "--format", "json", "--filter", "state=ALIVE", timeout=120)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        if out.stdout.strip().startswith("No resource"):  # how `ray list` says "none yet"
            return []
        return json.loads(out.stdout)

    def wait_for_nodes(self, count: int, starting: Node | None = None, timeout_s: float = 180) -> list[dict]:
        """Wait until exactly `count` nodes are alive: after a start (failing early if the head
        or `starting` exits) or after a loss (once the head has noticed it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in (self.head, starting):
                if node is not None and not node.alive():
                    raise RuntimeError(f"ray node {node.name} exited: {node.tail()}")
            nodes = self.alive_nodes()
            if len(nodes) == count:
                return nodes
            time.sleep(1)
        raise RuntimeError(f"not {count} live nodes after {timeout_s:.0f}s")

    def _wait_jobs_api(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.head.alive():
                raise RuntimeError(f"ray head exited: {self.head.tail()}")
            try:
                if self.ray("job", "list", check=False, timeout=60).returncode == 0:
                    return
            except subprocess.TimeoutExpired:  # a loaded machine: the dashboard is still starting
                pass
            time.sleep(2)
        logs = self.root / "head" / "session_latest" / "logs" / "dashboard.log"
        dashboard = logs.read_text()[-3000:] if logs.exists() else "(no dashboard.log)"
        raise RuntimeError(f"the ray head's Jobs API did not come up in {timeout_s:.0f}s:\n{self.head.tail()}\n"
                           f"dashboard.log:\n{dashboard}")

    def kill_gcs(self) -> dict:
        """SIGKILL the head's GCS server (a detached head's: `detached_head=True`). Returns what
        `restart_gcs` needs to start the same server again."""
        import psutil

        (pid,) = self.head.pids_named("gcs_server")
        proc = psutil.Process(pid)
        saved = {"cmd": proc.cmdline(), "env": proc.environ(), "cwd": proc.cwd()}
        proc.kill()
        proc.wait(timeout=30)
        return saved

    def restart_gcs(self, saved: dict) -> None:
        """Start the GCS server again with its own command line, as a supervisor would: with
        GCS fault tolerance on, it reloads the cluster's state from Redis."""
        subprocess.Popen(saved["cmd"], env=saved["env"], cwd=saved["cwd"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        """Worker nodes first, then the head: each through its own process, never `ray stop`."""
        for node in reversed(self.nodes):
            node.stop()

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, head_cpus: float = 2, extra_env: dict | None = None, detached_head: bool = False):
        """A cluster under a new folder in /tmp (short: Ray's socket paths are bounded to ~107
        characters), stopped and its folder removed on exit; `cluster.root` holds anything
        else that should go with it."""
        root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
        try:
            with cls(root, head_cpus, extra_env, detached_head) as cluster:
                yield cluster
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
