"""Teacher training on one GPU: MFU of our DeepSpeed step against a bare PyTorch loop.

Model FLOPs achieved / the GPU's bf16 dense peak (989 TFLOP/s on an H100 or H200 SXM) for the
gpu-single preset, beside the same model without offload and a bare PyTorch loop. In one run,
on the same model, image size and synthetic batches already on the GPU (only the training step
is measured):
  bare    plain PyTorch: fp32 weights, bf16 autocast, fused AdamW, gradient clipping;
  zero0   ours (sharding.wrap + loop.train_step, what the Ray Train worker runs), ZeRO off,
          bf16 in DeepSpeed's torch_autocast mode (fp32 weights, bf16 autocast compute);
  zero3   ours, ZeRO-3, bf16 autocast, nothing offloaded;
  bf16mode  zero0 in DeepSpeed's bf16 mode instead (bf16 weights, fp32 master copy), for the
          side-by-side with torch_autocast (fails on BatchNorm nets);
  preset  ours exactly as configs/gpu-single.yaml sets it: ZeRO-3 with parameters and optimizer
          state offloaded to host memory, activation checkpointing, its micro-batch and
          accumulation.
A variant may name another arch after '@' (preset@vit_gigantic_patch14_clip_224) to find the
largest teacher that trains. Each variant runs in its own process (world size 1, NCCL), so
one that runs out of memory fails alone; its peak GPU memory and host RSS are reported.
Model FLOPs per sample are counted once per arch with torch's FlopCounterMode on a forward +
backward without recomputation (so activation checkpointing's extra forward earns no credit).

Target: the preset >= 40% MFU.

    python bench/gpu_teacher.py [--variants bare,zero0,bf16mode,zero3,preset] [--steps 8] [--quick]
--quick times 3 steps instead of --steps. Without a GPU it measures nothing, unless variants
are named: then it runs them on the CPU (gloo, fp32, 32x32 images; no MFU), a dry run of the
same code, whose record goes to runs/bench/gpu_teacher.cpu.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from harness import Bench

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "gpu-single.yaml"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, SXM
TARGET_MFU = 0.40


def teacher_config(variant: str, arch: str | None, cpu: bool):
    """The preset's teacher settings, changed as the variant says."""
    from raydistill.config import load_config

    sets = [f"teacher.arch={arch}"] if arch else []
    if variant in ("bare", "zero0", "zero3", "bf16mode"):
        sets += ["teacher.offload_optimizer=none", "teacher.offload_param=none",
                 "teacher.activation_checkpointing=false", "teacher.grad_accum_steps=1",
                 f"teacher.zero_stage={3 if variant == 'zero3' else 0}"]
    if cpu:  # dry run: what DeepSpeed allows on a CPU
        sets += ["teacher.use_gpu=false", "teacher.precision=fp32", "teacher.offload_optimizer=none",
                 "teacher.offload_param=none", "data.image_size=32", "teacher.batch_size=4",
                 "teacher.cpus_per_worker=2"]
    return load_config(PRESET, sets)


def flops_per_sample(net, image_size: int, device, dtype) -> float:
    """Model FLOPs of one training sample (forward + backward), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        net(x).float().sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def run_variant(name: str, steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from raydistill import sharding
    from raydistill.loop import CrossEntropy, train_step
    from raydistill.training import teacher_network, teacher_recipe, teacher_schedule

    variant, _, arch = name.partition("@")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cfg = teacher_config(variant, arch or None, cpu=not cuda)
    tcfg = cfg.teacher
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, device_id=device if cuda else None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[tcfg.dtype_name]
    # The rows only size the step plan, which this loop does not use.
    recipe = teacher_recipe(cfg.with_values({"teacher.activation_checkpointing": False}), 10, (1, 8, 8), 10**7)
    spec = recipe.spec
    with device:  # build on the GPU: initialising 1B parameters on the host takes long
        net = teacher_network(recipe)
    per_sample = flops_per_sample(net, spec.image_size, device, dtype)
    net.set_grad_checkpointing(tcfg.activation_checkpointing)
    params = sum(p.numel() for p in net.parameters())
    micro, accum = tcfg.batch_size, tcfg.grad_accum_steps
    total = (steps + warmup) * accum
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(micro, 1, spec.image_size, spec.image_size, device=device, generator=gen),
                torch.randint(0, 10, (micro,), device=device, generator=gen)) for _ in range(4)]

    if variant == "bare":
        opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=cuda)

        def step(x, y):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), tcfg.grad_clip)
            opt.step()
            return loss.item()
    else:
        ds_config = sharding.deepspeed_config(tcfg, 1)
        in_dtype = torch.float32  # fp32 inputs and weights; autocast picks bf16 per op
        if variant == "bf16mode":
            ds_config["torch_autocast"]["enabled"] = False
            ds_config["bf16"] = {"enabled": True}
            in_dtype = torch.bfloat16
        engine = sharding.wrap(net, ds_config, teacher_schedule(tcfg, total // accum))
        loss = CrossEntropy()

        def step(x, y):
            return train_step(engine, loss, {"image": x.to(in_dtype), "label": y})

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for i in range(warmup * accum):
        step(*batches[i % len(batches)])
    sync()
    start = time.perf_counter()
    for i in range(steps * accum):
        loss = step(*batches[i % len(batches)])
    sync()
    seconds = time.perf_counter() - start
    samples_per_s = steps * accum * micro / seconds
    gpu = torch.cuda.get_device_name(0) if cuda else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    achieved = per_sample * samples_per_s / 1e12
    dist.destroy_process_group()
    return {
        "variant": name, "arch": tcfg.arch, "params": params, "device": gpu or "cpu",
        "precision": "bf16 weights" if variant == "bf16mode" else tcfg.dtype_name + (" autocast" if cuda else ""), "zero_stage": 0 if variant == "bare" else tcfg.zero_stage,
        "offload": f"optimizer={tcfg.offload_optimizer} param={tcfg.offload_param}" if variant != "bare" else "none",
        "activation_checkpointing": tcfg.activation_checkpointing, "micro_batch": micro, "accum": accum,
        "image_size": spec.image_size, "step_s": seconds / steps, "samples_per_s": samples_per_s,
        "model_gflops_per_sample": per_sample / 1e9, "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None, "last_loss": loss,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def spawn(name: str, args) -> dict:
    """One variant in a fresh process: a failure (out of memory, say) costs only its row."""
    from raydistill.testing.localcluster import free_ports

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {args.timeout}s"}
    rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"variant": name, "error": f"exit {out.returncode}: " + " | ".join(tail)}
    return {**json.loads(rows[-1]), "wall_s": time.perf_counter() - start}


def label(variant: str) -> str:
    return "bare PyTorch" + variant[4:] if variant.partition("@")[0] == "bare" else f"ours, {variant}"


def _fmt(value, spec: str, width: int) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def main() -> None:
    bench = Bench("gpu_teacher", __doc__, repeats=None,
                  target=f"the gpu-single preset >= {TARGET_MFU:.0%} MFU (of the bf16 dense peak)")
    parser = bench.parser
    parser.add_argument("--variants", default="bare,zero0,zero3,preset",
                        help="comma-separated; VARIANT@ARCH runs it on another timm arch")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant (3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its row
    args = bench.parse()
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps, args.warmup)), flush=True)
        return
    if args.quick:
        args.steps = 3
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and args.variants == parser.get_default("variants"):
        print("no GPU here: nothing to measure (a CPU dry run: --variants bare@resnet10t,zero3@resnet10t)")
        return
    if not gpu and args.out is None:  # a dry run's record must not replace a GPU run's
        args.out = REPO / "runs" / "bench" / "gpu_teacher.cpu.json"
    rows = []
    for name in args.variants.split(","):
        row = spawn(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)  # each row as it comes: a run cut short keeps the rows done
    print(f"\n{'variant':<34} {'params':>7} {'zero':>4} {'batch':>8} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'GPU GiB':>8} {'host GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<34} failed: {r['error'][:200]}")
            continue
        print(f"{r['variant']:<34} {r['params'] / 1e9:>6.2f}B {r['zero_stage']:>4} {r['micro_batch']:>4}x{r['accum']:<3} "
              f"{r['samples_per_s']:>10.1f} {r['achieved_tflops']:>8.1f} {_fmt(r['mfu'], '.1%', 6)} "
              f"{_fmt(r['gpu_peak_gib'], '.1f', 8)} {r['host_peak_rss_gib']:>8.1f}")

    done = [r for r in rows if "error" not in r]
    preset = [r for r in done if r["variant"].partition("@")[0] == "preset" and r["mfu"] is not None]
    with_mfu = bool(done) and all(r["mfu"] is not None for r in done)
    bench.finish(
        met=any(r["mfu"] >= TARGET_MFU for r in preset),
        figures={"steps": args.steps, "warmup": args.warmup,
                 "variants": {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows}},
        # MFU where the GPU's peak is known; samples/s otherwise (a CPU dry run, another card)
        compare={label(r["variant"]): 100 * r["mfu"] if with_mfu else r["samples_per_s"] for r in done} or None,
        unit="MFU (% of the bf16 dense peak)" if with_mfu else "samples/s",
        notes="" if gpu else "A CPU dry run (gloo, fp32): it checks the code path, it measures no MFU.",
    )


if __name__ == "__main__":
    main()
