"""The sharded teacher on a real local Ray: ZeRO-3 over 2 gloo workers, a driver stopped and
rerun, the consolidated export, and refusals before any start. A worker lost mid-run (its
whole node, SIGKILLed) is tested in test_multinode.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raydistill.config import load_config
from raydistill.models import ModelSpec, build_network, load_matching
from raydistill.training import StepPlan

from conftest import BIN, REPO

# 2 epochs of 9 steps on the digits' 1,258 training rows; a checkpoint every 3 steps.
KEEP = 2
QUICK = ["teacher.epochs=2", "teacher.checkpoint_every_steps=3", f"teacher.keep_checkpoints={KEEP}"]
TOTAL_STEPS = StepPlan.of(1258, 2, 64, 2).total_steps


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("teacher/ray/teacher-*/checkpoint_*") if p.is_dir())


def _train_cmd(storage: Path, *sets: str) -> list[str]:
    cmd = [str(BIN / "raydistill"), "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--storage", str(storage), "--name", "resume"]
    for item in (*QUICK, *sets):
        cmd += ["--set", item]
    return cmd


def test_stopped_driver_resumes_from_latest_checkpoint(tmp_path):
    run_dir = tmp_path / "resume"
    proc = subprocess.Popen(_train_cmd(tmp_path), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(_checkpoints(run_dir)) < 2 and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before its first checkpoint"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the driver and the Ray it started
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["teacher"]["status"] in ("interrupted", "failed")
    assert not (run_dir / "teacher" / "teacher.safetensors").exists()

    rerun = subprocess.run(_train_cmd(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    summary = json.loads((run_dir / "teacher" / "summary.json").read_text())
    assert summary["resumes"] >= 1 and summary["resumed_from_step"] >= 3, rerun.stdout[-3000:]
    assert summary["restarts"] == 0  # a rerun is a resume, not a restart after a worker failure
    assert summary["steps"] == TOTAL_STEPS  # the same count as an uninterrupted run
    assert "resumed from the checkpoint at step" in rerun.stdout + rerun.stderr
    # ZeRO-3 over 2 ranks: each holds about half of the parameters.
    per_rank, total = summary["params_per_rank"], summary["params_total"]
    assert len(per_rank) == 2 and sum(per_rank) >= total
    assert all(abs(n - total / 2) <= 0.01 * total for n in per_rank)
    # The plain torch model built from teacher.safetensors gives the sharded engine's logits.
    assert summary["export_check"]["max_abs_logit_diff"] <= 1e-4
    assert summary["accuracy"] > 0.8
    # Rank 0 measured how long it waited for augmented batches (a share of its step time).
    assert 0.0 <= summary["data_wait_fraction"] < 1.0 and summary["data_first_batch_s"] > 0
    # Old checkpoints are deleted: the rerun keeps its latest K. Folders Ray Train never
    # registered stay (it manages only the K it knows): the one the stopped run was writing,
    # and the one it may have written in the moment before its controller stopped.
    assert len(_checkpoints(run_dir)) <= KEEP + 2
    assert list((run_dir / "teacher" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("sets, exit_code, message", [
    (["teacher.precision=fp16"], 2, "teacher.precision=fp16 needs teacher.use_gpu"),
    (["teacher.offload_optimizer=cpu"], 2, "teacher.offload_optimizer moves state off the GPU"),
    (["teacher.use_gpu=true", "teacher.zero_stage=2", "teacher.offload_param=cpu"], 2,
     "offload_param needs teacher.zero_stage=3"),
    (["teacher.use_gpu=true", "teacher.offload_param=nvme"], 2, "needs teacher.nvme_path"),
    (["teacher.global_batch_size=100", "teacher.num_workers=3"], 2, "does not divide"),
    (["teacher.global_batch_size=256", "teacher.batch_size=64"], 2, "not teacher.global_batch_size=256"),
    (["teacher.arch=vgg11", "teacher.activation_checkpointing=true"], 1, "vgg11 does not support it"),
])
def test_bad_teacher_settings_are_refused_before_ray_starts(tmp_path, sets, exit_code, message):
    out = subprocess.run(_train_cmd(tmp_path, *sets), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == exit_code, out.stderr
    assert message in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr


# More refusals of the same kind as the vgg11 one above (exit 1 from the same check, before
# Ray starts), checked in this process: a CLI start costs seconds of imports each.
@pytest.mark.parametrize("sets, message", [
    (["teacher.arch=no_such_net"], "unknown timm architecture 'no_such_net'"),
    (["teacher.batch_size=1024"], "cannot fill one step"),
    (["teacher.init_from=missing.safetensors"], "missing.safetensors: no such file"),
])
def test_check_teacher_refuses_what_cannot_run(sets, message):
    from raydistill.training import check_teacher

    cfg = load_config(REPO / "configs" / "demo.yaml", sets)
    spec = ModelSpec(cfg.teacher.arch, 10, (1, 8, 8), cfg.data.image_size)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_teacher(cfg, spec, n_train=1258)  # the digits' training split


def test_init_from_loads_matching_tensors_and_keeps_a_new_head(tmp_path):
    brought = build_network(ModelSpec("resnet10t", 5, (1, 8, 8), 16))  # another task's classes
    path = tmp_path / "brought.safetensors"
    save_file({k: v.contiguous() for k, v in brought.state_dict().items()}, str(path))
    torch.manual_seed(1)
    net = build_network(ModelSpec("resnet10t", 10, (1, 8, 8), 16))
    fresh = load_matching(net, str(path))
    assert fresh == ["fc.bias", "fc.weight"]
    assert torch.equal(net.state_dict()["conv1.0.weight"], brought.state_dict()["conv1.0.weight"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        load_matching(net, str(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("preset, min_params", [("gpu-single.yaml", 1_000_000_000), ("gpu-cluster.yaml", 1_000_000_000)])
def test_gpu_presets_validate_and_build_deepspeed_configs(preset, min_params):
    from raydistill import sharding
    from raydistill.training import check_teacher

    cfg = load_config(REPO / "configs" / preset)
    tcfg = cfg.teacher
    assert tcfg.use_gpu and tcfg.zero_stage == 3 and tcfg.dtype_name == "bf16"
    spec = ModelSpec(tcfg.arch, 10, (1, 8, 8), cfg.data.image_size)
    info = check_teacher(cfg, spec, n_train=200_000)  # meta device: no weights are allocated
    assert info["params"] >= min_params
    ds = sharding.deepspeed_config(tcfg, tcfg.num_workers, total_steps=1000)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_batch_size"] == tcfg.batch_size * tcfg.grad_accum_steps * tcfg.num_workers
    if preset == "gpu-single.yaml":
        assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's CPU Adam on offloaded state


def test_deepspeed_config_follows_the_typed_config():
    from raydistill import sharding
    from raydistill.config import TeacherConfig

    gpu = TeacherConfig(use_gpu=True, num_workers=4, batch_size=8, grad_accum_steps=4, precision="fp16",
                        lr_schedule="linear", grad_clip=0, zero_stage=2, offload_optimizer="nvme", nvme_path="/nvme")
    ds = sharding.deepspeed_config(gpu, 4, total_steps=100)
    assert ds["train_batch_size"] == 8 * 4 * 4 and ds["gradient_accumulation_steps"] == 4
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} and not ds["bf16"]["enabled"]
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and ds["gradient_clipping"] == 0
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    sharding.validate(ds)  # DeepSpeed's own ZeRO schema accepts it
    cpu = sharding.deepspeed_config(TeacherConfig(lr_schedule="constant"), 2, total_steps=10)
    assert cpu["scheduler"]["type"] == "WarmupLR" and not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no JIT-built op on CPU
    with pytest.raises(ValueError, match="DeepSpeed rejects the ZeRO config"):
        sharding.validate({"zero_optimization": {"stage": 3, "no_such_key": 1}})
