"""Sharded teacher checkpoints: real DeepSpeed engines on 2 gloo ranks (no Ray needed).

Training k steps, saving, building a fresh engine, loading and training the rest must give
bit-identical weights to an uninterrupted run: the Adam moments, step counters, LR schedule
and BatchNorm buffers all come back.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydistill import checkpoints, sharding
from raydistill.artifacts import sha256
from raydistill.config import TeacherConfig
from raydistill.loop import CrossEntropy, train_step
from raydistill.models import ModelSpec, build_network
from raydistill.training import teacher_schedule

SPEC = ModelSpec("test_resnet", 10, (1, 8, 8), 16)  # timm, 0.37M params: engine set-up in seconds
STEPS, SAVE_AT, MICRO_BATCH = 6, 3, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(tcfg: TeacherConfig, world: int):
    torch.manual_seed(0)
    net = build_network(SPEC)
    if tcfg.activation_checkpointing:
        net.set_grad_checkpointing(True)
    return sharding.wrap(net, sharding.deepspeed_config(tcfg, world), teacher_schedule(tcfg, STEPS))


def _train(engine, batches) -> None:
    for x, y in batches:
        train_step(engine, CrossEntropy(), {"image": x, "label": y})


def _resume_vs_whole(tcfg: TeacherConfig, rank: int, world: int, workdir: Path) -> dict:
    accum = tcfg.grad_accum_steps
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(MICRO_BATCH, 1, 16, 16, generator=gen), torch.randint(0, 10, (MICRO_BATCH,), generator=gen))
               for _ in range(STEPS * accum)]
    whole = _engine(tcfg, world)
    _train(whole, batches)
    expected = sharding.consolidated_state_dict(whole)

    first = _engine(tcfg, world)
    _train(first, batches[: SAVE_AT * accum])
    checkpoints.save(first, workdir, rank=rank, world_size=world, step=SAVE_AT,
                     counters={"fit_id": "a", "restarts": 0, "resumes": 0})
    dist.barrier()
    resumed = _engine(tcfg, world)
    state = checkpoints.load(resumed, workdir, rank=rank, world_size=world)
    _train(resumed, batches[SAVE_AT * accum:])
    got = sharding.consolidated_state_dict(resumed)
    if rank != 0:  # below ZeRO-3 only rank 0 consolidates
        return {}
    return {
        "step": state["step"],
        "files": sorted(p.name for p in workdir.iterdir()),
        "max_diff": max((expected[k].float() - got[k].float()).abs().max().item() for k in expected),
        "moved": max((expected[k].float() - build_network(SPEC).state_dict()[k].float()).abs().max().item()
                     for k in expected if k.endswith("weight")),
    }


def _worker(rank: int, world: int, port: int, root: str, results) -> None:
    """Every setting in one process group: spawning ranks and importing DeepSpeed is most of
    the cost, so the settings share it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for i, (settings, _) in enumerate(SETTINGS):
        tcfg = TeacherConfig(num_workers=world, batch_size=MICRO_BATCH, **settings)
        workdir = Path(root) / str(i)
        if rank == 0:
            workdir.mkdir()
        dist.barrier()
        out = _resume_vs_whole(tcfg, rank, world, workdir)
        if rank == 0:
            results.put((i, out))
    dist.destroy_process_group()
    # Leave without interpreter teardown: a spawned rank has aborted there ("terminate called
    # without an active exception", a native thread still joinable) after its results were in.
    os._exit(0)


SETTINGS = [  # (teacher settings, checkpoint shard files)
    (dict(zero_stage=3), 2),
    (dict(zero_stage=3, grad_accum_steps=2, activation_checkpointing=True), 2),
    (dict(zero_stage=2), 1),
    (dict(zero_stage=0), 1),
    # 16-bit (torch_autocast; bf16 autocast runs on CPU too) on a BatchNorm net: DeepSpeed's
    # bf16 mode failed here on the first step (fp32 running stats beside bf16 weights).
    (dict(zero_stage=3, use_gpu=True, precision="bf16"), 2),
]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    root = tmp_path_factory.mktemp("resume")
    mp.spawn(_worker, args=(2, _free_port(), str(root), results), nprocs=2)
    return dict(results.get() for _ in SETTINGS)


@pytest.mark.parametrize("index", range(len(SETTINGS)), ids=[str(s) for s, _ in SETTINGS])
def test_resume_from_checkpoint_equals_uninterrupted_run(resumed_runs, index):
    out, shard_files = resumed_runs[index], SETTINGS[index][1]
    assert out["step"] == SAVE_AT
    # ZeRO-3: each rank wrote its own shard; below stage 3 rank 0 holds the whole state.
    assert out["files"] == sorted([checkpoints.STATE_FILE, *(checkpoints.shard_file(r) for r in range(shard_files))])
    assert out["moved"] > 1e-3  # training changed the weights, so equality below means something
    assert out["max_diff"] == 0.0


def test_unreadable_or_mismatched_checkpoints_are_refused_by_name(tmp_path):
    (tmp_path / checkpoints.STATE_FILE).write_text('{"step": 3, "world_size": 4, "zero_stage": 3}')
    engine = type("E", (), {"zero_optimization_stage": lambda self: 3, "optimizer": None})()
    with pytest.raises(checkpoints.CheckpointError, match="4 ranks with ZeRO-3; this run has 2 ranks"):
        checkpoints.load(engine, tmp_path, rank=0, world_size=2)
    (tmp_path / checkpoints.STATE_FILE).write_text('{"step": 3, "world_size": 2, "zero_stage": 3}')
    (tmp_path / checkpoints.shard_file(0)).write_bytes(b"\x00" * 5)  # truncated
    with pytest.raises(checkpoints.CheckpointError, match="shard-rank00000.safetensors is unreadable"):
        checkpoints.load(engine, tmp_path, rank=0, world_size=2)
    (tmp_path / checkpoints.STATE_FILE).write_text("{not json")
    with pytest.raises(checkpoints.CheckpointError, match="no readable state.json"):
        checkpoints.load(engine, tmp_path, rank=0, world_size=2)


BORDER_TAPS = """
import sys, torch
from raydistill import sharding
torch.set_num_threads(1)
if sys.argv[1] == "guarded":
    sharding._avoid_onednn_16bit_conv_on_cpu({"torch_autocast": {"enabled": True}})
g = torch.Generator().manual_seed(0)
x, go = torch.randn(8, 192, 1, 1, generator=g), torch.randn(8, 96, 1, 1, generator=g)
worst = 0.0
for _ in range(3):
    junk = [torch.full((1 << 16,), 1e30) for _ in range(256)]  # memory the allocator hands back next
    del junk
    w = (torch.randn(96, 192, 3, 3, generator=g) * 0.05).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
    y.backward(go.to(y.dtype))
    border = w.grad.clone()
    border[:, :, 1, 1] = 0  # over a 1x1 map only the centre tap sees data; the rest only padding
    worst = max(worst, border.abs().max().item())
print(worst)
"""


def test_16bit_cpu_training_gives_padding_only_taps_a_zero_gradient():
    """The cause of the bf16 resume mismatch: oneDNN's bf16 conv backward leaves these taps
    uninitialised on CPUs with avx512_bf16. With the guard sharding.wrap applies, they are 0."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BORDER_TAPS, "guarded"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0


def _fallback_worker(rank: int, world: int, port: int, root: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tcfg = TeacherConfig(num_workers=world, batch_size=MICRO_BATCH, zero_stage=3)
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(MICRO_BATCH, 1, 16, 16, generator=gen), torch.randint(0, 10, (MICRO_BATCH,), generator=gen))
               for _ in range(4)]
    engine = _engine(tcfg, world)
    older, newer = Path(root) / "checkpoint_a", Path(root) / "checkpoint_b"
    for directory, upto in ((older, 2), (newer, 4)):
        _train(engine, batches[upto - 2:upto])
        if rank == 0:
            directory.mkdir()
        dist.barrier()
        checkpoints.save(engine, directory, rank=rank, world_size=world, step=upto, counters={})
        dist.barrier()
    if rank == 1:  # one rank's shard of the newest checkpoint goes bad on storage
        shard = newer / checkpoints.shard_file(1)
        shard.write_bytes(shard.read_bytes()[:-64] + b"\0" * 64)
    dist.barrier()
    said = []
    state = checkpoints.load_first_good(_engine(tcfg, world), [newer, older], rank=rank, world_size=world,
                                        say=said.append)
    if rank == 1:
        (older / checkpoints.shard_file(1)).write_bytes(b"broken")
    dist.barrier()
    try:
        checkpoints.load_first_good(_engine(tcfg, world), [newer, older], rank=rank, world_size=world)
        both_bad = "loaded"
    except checkpoints.CheckpointError as err:
        both_bad = str(err)
    results.put((rank, {"step": state["step"], "said": said, "both_bad": both_bad,
                        "hashes": sorted(json.loads((newer / checkpoints.STATE_FILE).read_text())["shards"])}))
    dist.destroy_process_group()
    # Leave without interpreter teardown: a spawned rank has aborted there ("terminate called
    # without an active exception", a native thread still joinable) after its results were in.
    os._exit(0)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_kept_one(tmp_path):
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_fallback_worker, args=(2, _free_port(), str(tmp_path), results), nprocs=2)
    by_rank = dict(results.get() for _ in range(2))
    assert by_rank[0]["hashes"] == [checkpoints.shard_file(0), checkpoints.shard_file(1)]
    assert by_rank[0]["step"] == by_rank[1]["step"] == 2  # both ranks resume from the same, older one
    assert len(by_rank[0]["said"]) == 1 and "falling back to checkpoint_a" in by_rank[0]["said"][0]
    assert by_rank[1]["said"] == []  # rank 0 speaks for the group
    for rank in (0, 1):
        assert "none of the 2 kept checkpoints is usable on every rank" in by_rank[rank]["both_bad"]
    assert "is corrupt: its sha256 differs" in by_rank[1]["both_bad"]


SAVER = """
import shutil, sys, torch
from pathlib import Path
from raydistill import checkpoints
from raydistill.config import TeacherConfig
from raydistill.training import single_process_group
sys.path.insert(0, sys.argv[2])
from test_checkpoints import MICRO_BATCH, _engine, _train
single_process_group()
torch.set_num_threads(1)
root = Path(sys.argv[1])
engine = _engine(TeacherConfig(num_workers=1, batch_size=MICRO_BATCH, zero_stage=3), 1)
gen = torch.Generator().manual_seed(0)
batch = [(torch.randn(MICRO_BATCH, 1, 16, 16, generator=gen), torch.randint(0, 10, (MICRO_BATCH,), generator=gen))]
_train(engine, batch)
if not (root / "good").exists():
    (root / "good").mkdir()
    checkpoints.save(engine, root / "good", rank=0, world_size=1, step=1, counters={})
print("go", flush=True)
latest, step = root / sys.argv[3], 1
while True:  # SIGKILLed somewhere in here, as a worker dies mid-save
    step += 1
    shutil.rmtree(latest, ignore_errors=True)
    latest.mkdir()
    checkpoints.save(engine, latest, rank=0, world_size=1, step=step, counters={})
"""

RESUMER = """
import json, sys, torch
from pathlib import Path
from raydistill import checkpoints
from raydistill.config import TeacherConfig
from raydistill.training import single_process_group
sys.path.insert(0, sys.argv[2])
from test_checkpoints import MICRO_BATCH, _engine
single_process_group()
root, found = Path(sys.argv[1]), []
for latest in sys.argv[3:]:
    said = []
    engine = _engine(TeacherConfig(num_workers=1, batch_size=MICRO_BATCH, zero_stage=3), 1)
    state = checkpoints.load_first_good(engine, [root / latest, root / "good"], rank=0, world_size=1, say=said.append)
    found.append({"step": state["step"], "said": said})
print(json.dumps(found))
"""


def test_a_worker_killed_mid_save_never_leaves_a_checkpoint_that_loads_wrong(tmp_path):
    """A process saving checkpoints in a loop is SIGKILLed at several moments; resuming then
    loads the last checkpoint only if it is whole (every shard's sha256 as state.json records),
    else says so and falls back to the previous good one."""
    import signal
    import subprocess
    import sys
    import time

    tests = str(Path(__file__).parent)
    names = []
    for i, delay in enumerate((0.05, 0.5)):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), tests, f"latest{i}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in saver.stdout:  # DeepSpeed logs to stdout before it
            if line.strip() == "go":
                break
        assert saver.poll() is None, "the saver died before its first save"
        time.sleep(delay)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        names.append(f"latest{i}")
    out = subprocess.run([sys.executable, "-c", RESUMER, str(tmp_path), tests, *names], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name, found in zip(names, json.loads(out.stdout.strip().splitlines()[-1])):
        state_file = tmp_path / name / checkpoints.STATE_FILE
        whole = state_file.exists() and _is_json(state_file) and all(
            (tmp_path / name / shard).exists() and sha256(tmp_path / name / shard) == digest
            for shard, digest in json.loads(state_file.read_text())["shards"].items())
        print(f"{name}: {'whole' if whole else 'cut short'}; resumed from step {found['step']}")
        if whole:
            assert found["step"] == json.loads(state_file.read_text())["step"] >= 2 and not found["said"]
        else:
            assert found["step"] == 1 and "falling back to good" in found["said"][0], (name, found)


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except ValueError:
        return False
