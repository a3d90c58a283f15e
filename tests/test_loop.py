"""The one training loop (loop.fit) and its parts: the LR schedule every engine follows, the
plain/DDP engine's accumulation and clipping, and when fit reports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from raydistill.loop import FLOOR, CrossEntropy, LRFactor, TorchEngine, fit, lr_schedule
from raydistill.training import StepPlan


def test_the_lr_warms_up_linearly_then_decays_as_asked():
    cosine = LRFactor("cosine", total=100, warmup=10)
    assert cosine(0) == pytest.approx(FLOOR) and cosine(5) == pytest.approx((1 + FLOOR) / 2)
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx((1 + FLOOR) / 2)
    assert cosine(100) == pytest.approx(FLOOR) and cosine(500) == pytest.approx(FLOOR)
    assert LRFactor("linear", 100, 0)(50) == pytest.approx(0.5) and LRFactor("linear", 100, 0)(100) == 0.0
    assert LRFactor("constant", 100, 10)(99) == 1.0
    values = [LRFactor("cosine", 100, 10)(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup


def test_the_schedule_survives_a_json_round_trip_of_its_state():
    """Checkpoints keep the scheduler's state as JSON; a restored schedule continues exactly."""
    import json

    def sched():
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, lr_schedule(opt, "cosine", 20, 0.25)

    opt, first = sched()
    for _ in range(7):
        opt.step()
        first.step()
    opt2, second = sched()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for _ in range(5):
        opt.step(), first.step(), opt2.step(), second.step()
        assert first.get_last_lr() == second.get_last_lr()


def _linear_model():
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def test_accumulated_micro_batches_take_the_step_one_large_batch_would():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    whole = TorchEngine(_linear_model(), lr=0.1, weight_decay=0.0, total_steps=2, schedule="constant")
    split = TorchEngine(_linear_model(), lr=0.1, weight_decay=0.0, total_steps=2, schedule="constant", accum=2)
    fit(whole, CrossEntropy(), enumerate([{"image": x, "label": y}], start=1), StepPlan(1, 1), lambda s, l: None)
    halves = [{"image": x[:4], "label": y[:4]}, {"image": x[4:], "label": y[4:]}]
    fit(split, CrossEntropy(), enumerate(halves, start=1), StepPlan(1, 1, accum=2), lambda s, l: None)
    assert split.optimizer.state_dict()["state"][0]["step"] == 1  # one optimizer step, not two
    for a, b in zip(whole.module.parameters(), split.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.equal(a, _linear_model().weight if a.dim() == 2 else _linear_model().bias)


def test_clipping_bounds_the_gradient_norm_of_the_step():
    big = {"image": 1e3 * torch.randn(8, 6, generator=torch.Generator().manual_seed(2)),
           "label": torch.zeros(8, dtype=torch.long)}
    norms = []
    for clip in (0.0, 0.5):
        engine = TorchEngine(_linear_model(), lr=0.1, weight_decay=0.0, total_steps=1, grad_clip=clip)
        engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs, module=engine.module: norms.append(
            torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item()))
        fit(engine, CrossEntropy(), enumerate([big], start=1), StepPlan(1, 1), lambda s, l: None)
    assert norms[0] > 10 and norms[1] == pytest.approx(0.5, rel=1e-4)


def test_fit_reports_every_optimizer_step_and_the_epoch_mean_at_its_end():
    batches = [{"image": torch.randn(4, 6), "label": torch.randint(0, 3, (4,))} for _ in range(8)]
    engine = TorchEngine(_linear_model(), lr=0.01, weight_decay=0.0, total_steps=4, accum=2)
    calls = []
    fit(engine, CrossEntropy(), enumerate(batches, start=1), StepPlan(epochs=2, steps_per_epoch=2, accum=2),
        lambda step, loss: calls.append((step, loss)))
    assert [s for s, _ in calls] == [1, 2, 3, 4]
    assert calls[0][1] is None and calls[2][1] is None and calls[1][1] > 0 and calls[3][1] > 0


DEEPSPEED_LRS = """
import json, torch
from raydistill import sharding
from raydistill.config import TeacherConfig
from raydistill.loop import CrossEntropy, TorchEngine, fit
from raydistill.training import StepPlan, single_process_group, teacher_schedule
single_process_group()
tcfg = TeacherConfig(lr=0.01, lr_schedule="cosine", warmup_fraction=0.3, grad_clip=1.0, batch_size=4, zero_stage=0)
plan = StepPlan(epochs=1, steps_per_epoch=10)
out = {}
for kind in ("deepspeed", "torch"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    if kind == "deepspeed":
        engine = sharding.wrap(net, sharding.deepspeed_config(tcfg, 1), teacher_schedule(tcfg, plan.total_steps))
    else:
        engine = TorchEngine(net, lr=tcfg.lr, weight_decay=tcfg.weight_decay, total_steps=plan.total_steps,
                             schedule=tcfg.lr_schedule, warmup_fraction=tcfg.warmup_fraction, grad_clip=tcfg.grad_clip)
    gen = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(4, 6, generator=gen), "label": torch.randint(0, 3, (4,), generator=gen)}
               for _ in range(10)]
    lrs = []
    fit(engine, CrossEntropy(), enumerate(batches, start=1), plan,
        lambda step, loss: lrs.append(engine.optimizer.param_groups[0]["lr"]))
    out[kind] = [lrs, [p.detach().flatten().tolist() for p in net.parameters()]]
print(json.dumps(out))
"""


def test_deepspeed_and_the_plain_engine_follow_one_schedule_and_step_alike():
    """The teacher's DeepSpeed engine (ZeRO-0, world 1) and TorchEngine, given one recipe, run
    the same LR at every step and end at the same weights. In a subprocess: DeepSpeed needs a
    process group, which would outlive the test in this one."""
    import json

    out = subprocess.run([sys.executable, "-c", DEEPSPEED_LRS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    (ds_lrs, ds_weights), (torch_lrs, torch_weights) = found["deepspeed"], found["torch"]
    assert ds_lrs == pytest.approx(torch_lrs, rel=1e-9) and len(ds_lrs) == 10
    assert max(ds_lrs) == pytest.approx(0.01) and ds_lrs[-1] == pytest.approx(0.01 * FLOOR, rel=1e-6)
    for a, b in zip(ds_weights, torch_weights):
        assert a == pytest.approx(b, abs=1e-6)
