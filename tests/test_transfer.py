"""Transfer learning: published weights read through the Hugging Face cache (a checkpoint saved
here in the hub's cache layout, so the real lookup and timm's real loader run), and the
fine-tuning parameter groups under a real DeepSpeed ZeRO-3 engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydistill import transfer
from raydistill.config import ConfigError, load_config
from raydistill.models import ModelSpec, build_network

REPO_ID = "timm/test_resnet.r160_in1k"  # timm's default weights for test_resnet


def cache_checkpoint(cache: Path, repo_id: str, state: dict) -> Path:
    """Write `state` as the hub cache holds a downloaded repository: blobs under snapshots/<commit>,
    refs/main naming the commit."""
    from safetensors.torch import save_file

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / transfer.WEIGHTS_FILE)
    return snapshot / transfer.WEIGHTS_FILE


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pretrained_weights_load_from_the_hub_cache_with_a_new_head(hub_cache):
    import timm

    torch.manual_seed(3)
    published = timm.create_model("test_resnet", num_classes=6).state_dict()  # another task's 6 classes
    published = {k: v + 0.01 if v.is_floating_point() else v for k, v in published.items()}  # not an init
    cache_checkpoint(hub_cache, REPO_ID, published)
    path = transfer.weights_path("test_resnet", True)
    for channels in (3, 1):
        net = build_network(ModelSpec("test_resnet", 3, (channels, 32, 32), 32))
        fresh = transfer.load_pretrained(net, "test_resnet", path, num_classes=3, in_chans=channels)
        state = net.state_dict()
        assert torch.equal(state["layer2.0.conv1.weight"], published["layer2.0.conv1.weight"])
        assert state["fc.weight"].shape == (3, published["fc.weight"].shape[1])
        stem = "conv1.0.weight"
        # timm's loader adapts the RGB stem to grey input (summing its channels); RGB loads as stored.
        assert fresh == (["fc.bias", "fc.weight"] if channels == 3 else [stem, "fc.bias", "fc.weight"])
        if channels == 1:
            assert torch.allclose(state[stem], published[stem].sum(1, keepdim=True))
    # the same file named by repository id, and by the local directory holding it
    assert transfer.weights_path("test_resnet", REPO_ID) == path
    assert transfer.weights_path("test_resnet", str(path.parent)) == path


def test_a_plain_cnn_takes_matching_tensors_from_a_named_repository(hub_cache):
    torch.manual_seed(0)
    source = build_network(ModelSpec("plain_cnn_s", 5, (3, 32, 32), 32))
    cache_checkpoint(hub_cache, "our-org/shapes-cnn", source.state_dict())
    net = build_network(ModelSpec("plain_cnn_s", 2, (3, 32, 32), 32))
    fresh = transfer.load_pretrained(net, "plain_cnn_s", transfer.weights_path("plain_cnn_s", "our-org/shapes-cnn"), 2, 3)
    assert fresh == ["fc.bias", "fc.weight"]
    assert torch.equal(net.features[0].weight, source.features[0].weight)


def test_missing_pretrained_weights_are_refused_by_name(hub_cache, tmp_path):
    with pytest.raises(ValueError, match=r"timm/test_resnet.r160_in1k/model.safetensors is not in the Hugging Face "
                                         r"cache .* the hub is unreachable \(HF_HUB_OFFLINE=1\)"):
        transfer.weights_path("test_resnet", True)
    with pytest.raises(ValueError, match="timm publishes no weights for 'plain_cnn_l'"):
        transfer.weights_path("plain_cnn_l", True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors there"):
        transfer.weights_path("test_resnet", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="teacher.pretrained and teacher.init_from"):
        load_config(None, ["teacher.pretrained=true", "teacher.init_from=/x.safetensors"])
    with pytest.raises(ConfigError, match="freeze_backbone_epochs=5 leaves no epoch"):
        load_config(None, ["teacher.freeze_backbone_epochs=5", "teacher.epochs=5"])


def test_parameter_groups_scale_the_backbone_and_decay_by_depth():
    net = build_network(ModelSpec("plain_cnn_s", 3, (3, 16, 16), 16))
    assert len(transfer.param_groups(net)) == 1  # no fine-tuning keys: the plain recipe
    groups = transfer.param_groups(net, backbone_lr_scale=0.5, layer_decay=0.5, frozen_steps=4)
    scales = sorted(g["lr_scale"] for g in groups)
    # stem + 3 stages below the head: 0.5 x 0.5^4 .. 0.5 x 0.5^1, then the head at 1
    assert scales == pytest.approx([0.5 * 0.5 ** k for k in (4, 3, 2, 1)] + [1.0])
    head = next(g for g in groups if g["lr_scale"] == 1.0)
    assert head["frozen_steps"] == 0 and {id(p) for p in head["params"]} == {id(p) for p in net.fc.parameters()}
    assert all(g["frozen_steps"] == 4 for g in groups if g is not head)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


FROZEN_UNDER_ZERO3 = """
import json, torch
from raydistill import sharding, transfer
from raydistill.config import TeacherConfig
from raydistill.loop import CrossEntropy, fit
from raydistill.models import ModelSpec, build_network
from raydistill.training import StepPlan, single_process_group, teacher_schedule
single_process_group()
tcfg = TeacherConfig(arch="plain_cnn_xs", lr=0.01, warmup_fraction=0.0, batch_size=4, zero_stage=3, epochs=3)
plan = StepPlan(epochs=3, steps_per_epoch=2)
torch.manual_seed(0)
net = build_network(ModelSpec("plain_cnn_xs", 3, (3, 16, 16), 16))
groups = transfer.param_groups(net, backbone_lr_scale=0.5, frozen_steps=2)
engine = sharding.wrap(net, sharding.deepspeed_config(tcfg, 1), teacher_schedule(tcfg, plan.total_steps), params=groups)
def snapshot():
    return {n: t.clone() for n, t in sharding.consolidated_state_dict(engine).items() if "running" not in n and "num_batches" not in n}
gen = torch.Generator().manual_seed(1)
batches = [{"image": torch.randn(4, 3, 16, 16, generator=gen), "label": torch.randint(0, 3, (4,), generator=gen)}
           for _ in range(6)]
seen = [snapshot()]
lrs = []
def after(step, loss):
    seen.append(snapshot())
    lrs.append(sorted(g["lr"] for g in engine.optimizer.param_groups))
fit(engine, CrossEntropy(), enumerate(batches, start=1), plan, after)
moved = [[n for n in seen[0] if not torch.equal(seen[i][n], seen[i + 1][n])] for i in range(6)]
print(json.dumps({"moved": moved, "lrs": lrs}))
"""


def test_a_frozen_backbone_stays_put_under_zero3_then_learns_at_its_share():
    """DeepSpeed ZeRO-3 with the fine-tuning groups: for the frozen steps only the classifier
    moves; after them the backbone learns at backbone_lr_scale x the head's LR."""
    out = subprocess.run([sys.executable, "-c", FROZEN_UNDER_ZERO3], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    moved, lrs = found["moved"], found["lrs"]
    assert all(set(m) == {"fc.weight", "fc.bias"} for m in moved[:2]), moved[:2]
    assert all(any(n.startswith("features.") for n in m) for m in moved[2:]), moved[2:]
    assert all(lo == 0.0 for lo, _ in lrs[:1])  # the LR after step 1 (step 2 still frozen)
    for lo, hi in lrs[2:]:
        assert lo == pytest.approx(0.5 * hi)
