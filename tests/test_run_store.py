"""The run store under crashes, races and a full disk: one writer per run name, writes that
are never seen half done, and a full disk that ends in a clear error with the manifest intact.
Real processes throughout (SIGKILL, a real file-size limit from the kernel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raydistill.artifacts import Run, RunLocked, load_weights, write_json

from conftest import BIN, REPO

HOLD = textwrap.dedent("""
    import sys, time
    from raydistill.artifacts import Run
    with Run(sys.argv[1], "same").lock():
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(storage):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(storage)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        second = subprocess.run([str(BIN / "raydistill"), "deploy", "--storage", str(tmp_path), "--name", "same"],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert second.returncode == 1, second.stderr
        assert f"run 'same' is in use by pid {holder.pid} on {os.uname().nodename}, started 20" in second.stderr
        with pytest.raises(RunLocked):
            with Run(tmp_path, "same").lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: no clean release
        holder.wait()
    out = subprocess.run([sys.executable, "-c", "import sys; from raydistill.artifacts import Run\n"
                          "with Run(sys.argv[1], 'same').lock(): print('took it')", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "took it" in out.stdout, out.stderr
    assert f"taking over the lock left by pid {holder.pid}" in out.stdout
    with Run(tmp_path, "same").lock():  # released cleanly this time: nothing to take over
        pass


WRITER = textwrap.dedent("""
    import sys, torch
    from raydistill.artifacts import save_weights, write_json
    kind, path, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    print("go", flush=True)
    for i in range(10**9):
        if kind == "json":
            write_json(path, {"writer": tag, "i": i, "rows": [[i] * 64] * 2000})
        else:
            save_weights(path, {"w": torch.full((512, 1024), float(i))}, {"writer": tag})
""")


@pytest.mark.parametrize("kind", ["json", "weights"])
def test_concurrent_writers_and_sigkill_never_leave_a_file_a_reader_misreads(tmp_path, kind):
    """Two processes rewrite the same file in a loop while a reader checks it; each is then
    SIGKILLed mid-loop, many times over. Every read must parse whole."""
    path = tmp_path / ("manifest.json" if kind == "json" else "teacher.safetensors")
    reads = 0
    for round_ in range(6):
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path), f"w{round_}{n}"],
                                    stdout=subprocess.PIPE, text=True) for n in range(2)]
        for w in writers:
            assert w.stdout.readline().strip() == "go"
        deadline = time.monotonic() + 1.0 + 0.3 * round_
        while time.monotonic() < deadline:
            if path.exists():
                if kind == "json":
                    assert json.loads(path.read_text())["writer"].startswith("w")
                else:
                    tensors, meta = load_weights(path)
                    assert tensors["w"].shape == (512, 1024) and meta["writer"].startswith("w")
                reads += 1
        for w in writers:
            w.send_signal(signal.SIGKILL)
            w.wait()
    assert reads > 20
    # A kill mid-write leaves at most hidden temp files, which nothing reads: ours
    # (.NAME.<id>.tmp) and safetensors' own writer's (.tmpXXXXXX, Rust's tempfile).
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(name.startswith(f".{path.name}.") and name.endswith(".tmp") or name.startswith(".tmp")
               for name in leftovers), leftovers


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from raydistill.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # past the limit, write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    sys.exit(main(sys.argv[2:]))
""")


def test_a_full_disk_is_a_clear_error_and_the_manifest_stays_valid(tmp_path):
    run = Run(tmp_path, "r")
    run.start({"seed": 0}, "c0ffee")
    with run.stage("teacher", "t1") as outputs:
        outputs.append(write_json(run.dir("teacher") / "summary.json", {"accuracy": 0.9}))
    before = run.manifest_path.read_bytes()
    # The manifest this command writes holds the whole config (a few KB): past a 1 KB limit.
    cmd = [sys.executable, "-c", FULL_DISK, "1024", "deploy", "--config", str(REPO / "configs" / "demo.yaml"),
           "--storage", str(tmp_path), "--name", "r"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "manifest.json: cannot write it (File too large)" in out.stderr and "Traceback" not in out.stderr
    assert run.manifest_path.read_bytes() == before
    assert json.loads(before)["stages"]["teacher"]["status"] == "done"
    assert not [p for p in run.root.iterdir() if p.name.endswith(".tmp")]


def test_each_stage_keeps_its_own_config_and_code_version(tmp_path):
    from raydistill.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    run = Run(tmp_path, "r")
    run.start(cfg.model_dump(mode="json"), cfg.digest())
    with run.stage("teacher", cfg.stage_digest("teacher"), config=cfg.stage_config("teacher")):
        pass
    later = cfg.with_values({"deploy.port": 9000, "teacher.epochs": 99})
    run.start(later.model_dump(mode="json"), later.digest())  # a later `deploy --set ...`
    record = run.manifest()["stages"]["teacher"]
    assert record["config"]["teacher"]["epochs"] == cfg.teacher.epochs and set(record["config"]) == {
        "seed", "task", "data", "teacher"}
    assert record["git_sha"] and len(record["git_sha"]) == 40
    assert run.manifest()["config"]["teacher"]["epochs"] == 99  # the top level: the last command's


def _touch_later(path, seconds=5):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_fingerprint_tells_changed_data_in_sample_and_full_modes(tmp_path):
    from raydistill.fingerprint import EDGE_BYTES, fingerprint

    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    big = folder / "big.bin"
    big.write_bytes(bytes(range(256)) * (4 * EDGE_BYTES // 256))
    (folder / "small.bin").write_bytes(b"x" * 10)
    root = str(tmp_path / "images")
    first = fingerprint(root)
    assert first == fingerprint(root) and first["files"] == 2 and first["bytes"] == 4 * EDGE_BYTES + 10
    assert fingerprint("file://" + root)["sha256"] == first["sha256"]  # a pyarrow URI of the same folder

    (folder / "small.bin").write_bytes(b"y" * 10)  # same size; new content and mtime
    assert fingerprint(root)["sha256"] != first["sha256"]
    second, full = fingerprint(root), fingerprint(root, full=True)
    # An edit in the middle of a large file that keeps its size and mtime: only `full` reads it.
    st = big.stat()
    with open(big, "r+b") as f:
        f.seek(2 * EDGE_BYTES)
        f.write(b"\xff")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(root)["sha256"] == second["sha256"]
    assert fingerprint(root, full=True)["sha256"] != full["sha256"]
    before_move = fingerprint(root, full=True)
    moved = tmp_path / "moved"
    (tmp_path / "images").rename(moved)  # the same files elsewhere: the same fingerprint
    assert fingerprint(str(moved), full=True) == before_move
    from raydistill.data import DataError

    with pytest.raises(DataError, match="nowhere.*no such file or folder"):
        fingerprint(str(tmp_path / "nowhere"))


@pytest.fixture
def local_ray():
    """The data stage prepares rows in Ray Data tasks: a Ray of this test's own (never one
    another process started on the machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_changed_data_at_the_same_path_redoes_the_data_stage_and_every_stage_after(tmp_path, digits_parquet,
                                                                                    local_ray):
    import shutil

    from raydistill.config import load_config
    from raydistill.pipeline import DATA_SUMMARY, load_data

    source = tmp_path / "digits.parquet"
    shutil.copy(digits_parquet, source)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.source={source}"])
    run = Run(tmp_path, "r")
    load_data(cfg, run)
    data_record = run.manifest()["stages"]["data"]
    with run.stage("teacher", cfg.stage_digest("teacher"), inputs=[run.root / DATA_SUMMARY]) as outputs:
        outputs.append(write_json(run.dir("teacher") / "summary.json", {"accuracy": 0.9}))
    load_data(cfg, run)  # the same data: nothing redone
    assert run.manifest()["stages"]["data"]["start"] == data_record["start"]
    assert run.is_done("teacher", cfg.stage_digest("teacher"))

    _touch_later(source)  # rewritten in place (same bytes here; a new export in real life)
    load_data(cfg, run)
    redone = run.manifest()["stages"]["data"]
    assert redone["start"] > data_record["start"] and redone["config_hash"] != data_record["config_hash"]
    summary = json.loads((run.root / DATA_SUMMARY).read_text())
    assert summary["source_fingerprint"]["files"] == 1 and summary["source_fingerprint"]["mode"] == "sample"
    assert not run.is_done("teacher", cfg.stage_digest("teacher"))


def test_a_failed_attempt_leaves_the_last_good_outputs_usable(tmp_path):
    from raydistill.artifacts import ArtifactError
    from raydistill.pipeline import _verify

    run = Run(tmp_path, "r")
    run.start({}, "c")
    weights = run.dir("student") / "student.safetensors"
    with run.stage("student", "s1") as outputs:
        outputs.append(write_json(weights, {"v": 1}))
    good = _verify(run, "student", weights)
    with pytest.raises(RuntimeError), run.stage("student", "s2"):
        raise RuntimeError("worker died mid-distillation")
    record = run.manifest()["stages"]["student"]
    assert record["status"] == "failed" and record["last_good"]["config_hash"] == "s1"
    assert _verify(run, "student", weights) == good  # deploy still serves the last good student
    with pytest.raises(KeyboardInterrupt), run.stage("student", "s3"):  # a second attempt, interrupted
        write_json(weights, {"v": "half-way"})  # it had overwritten the file before it stopped
        raise KeyboardInterrupt
    with pytest.raises(ArtifactError, match="sha256 differs"):  # refused, never mixed in
        _verify(run, "student", weights)
    with run.stage("student", "s4") as outputs:
        outputs.append(write_json(weights, {"v": 4}))
    assert run.manifest()["stages"]["student"]["last_good"] is None and _verify(run, "student", weights) != good


def test_a_full_disk_while_writing_weights_is_a_clear_error_too(tmp_path):
    """safetensors' writer reports the OS error in its own exception type."""
    script = textwrap.dedent("""
        import resource, signal, sys, torch
        from pathlib import Path
        from raydistill.artifacts import ArtifactError, save_weights
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_weights(Path(sys.argv[1]), {"w": torch.zeros(100_000)}, {})
        except ArtifactError as err:
            print(err)
    """)
    path = tmp_path / "student.safetensors"
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "student.safetensors: cannot write it (File too large)" in out.stdout, out.stderr
    assert list(tmp_path.iterdir()) == []  # no half file, no temp file left
