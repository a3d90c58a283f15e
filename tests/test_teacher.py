"""Teacher settings refused before any start, init_from, the presets and the DeepSpeed config.
The sharded teacher itself runs for real elsewhere: a worker lost mid-run (its whole node,
SIGKILLed) in test_multinode.py; a job stopped with `ray job stop` and resubmitted, resuming
from its checkpoint, in test_e2e_job.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raydistill.config import load_config
from raydistill.models import ModelSpec, build_network, load_matching

from conftest import BIN, REPO

QUICK = ["teacher.epochs=2"]


def _train_cmd(storage: Path, *sets: str) -> list[str]:
    cmd = [str(BIN / "raydistill"), "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--storage", str(storage), "--name", "resume"]
    for item in (*QUICK, *sets):
        cmd += ["--set", item]
    return cmd


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
    ds = sharding.deepspeed_config(tcfg, tcfg.num_workers)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
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
    ds = sharding.deepspeed_config(gpu, 4)
    assert ds["train_batch_size"] == 8 * 4 * 4 and ds["gradient_accumulation_steps"] == 4
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "bf16" not in ds and "fp16" not in ds
    assert "scheduler" not in ds and ds["gradient_clipping"] == 0  # the LR schedule is loop.lr_schedule
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    sharding.validate(ds)  # DeepSpeed's own ZeRO schema accepts it
    cpu = sharding.deepspeed_config(TeacherConfig(lr_schedule="constant"), 2)
    assert not cpu["torch_autocast"]["enabled"]
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no JIT-built op on CPU
    with pytest.raises(ValueError, match="DeepSpeed rejects the ZeRO config"):
        sharding.validate({"zero_optimization": {"stage": 3, "no_such_key": 1}})
