"""Teacher training throughput: our DeepSpeed step on Ray Train against a bare PyTorch loop.

In one run, on the same model, micro-batch and number of steps, with the machine's cores
split the same way: samples/s of
  - bare:        a plain PyTorch loop (AdamW, warmup-cosine LR, clipping) in one process,
  - 1 worker:    our training step (loop.train_step, cross-entropy) on Ray Train, ZeRO off,
  - 1 worker:    the same with ZeRO-3,
  - 2 workers:   ZeRO-3 over gloo, the machine's cores split between them,
and the bytes of parameters + optimizer state each rank holds (sharding.state_bytes).
Batches are synthetic tensors already in memory, so only the training step is measured.
Each variant runs --repeats times (3; 2 with --quick, which also times 20 steps instead of 60),
round-robin so that load drifts hit every variant alike, and its best run counts; the spread
is printed.

Targets (CPU): 1 worker >= 0.85x the bare loop; per-rank state at 2 workers <= 0.55x of 1 worker.

    python bench/train_throughput.py [--quick] [--repeats N] [--arch resnet10t] [--image-size 32]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from harness import Bench, best, interleave


def _batches(n: int, batch: int, size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def _timed(step, batches, warmup: int) -> float:
    """Seconds for the batches after `warmup` of them."""
    for x, y in batches[:warmup]:
        step(x, y)
    start = time.perf_counter()
    for x, y in batches[warmup:]:
        step(x, y)
    return time.perf_counter() - start


def bare(args, threads: int) -> dict:
    import math

    import torch
    import torch.nn.functional as F

    from raydistill.models import ModelSpec, build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(ModelSpec(args.arch, 10, (1, 8, 8), args.image_size))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    total = args.steps + args.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / total)))

    def step(x, y):
        net.train()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()

    secs = _timed(step, _batches(total, args.batch, args.image_size, 0), args.warmup)
    state = [p for p in net.parameters()] + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    return {"samples_per_s": args.steps * args.batch / secs,
            "state_bytes_per_rank": [sum(t.numel() * t.element_size() for t in state)]}


def ours_worker(config: dict) -> None:
    import ray.train
    import torch

    from raydistill import sharding
    from raydistill.config import TeacherConfig
    from raydistill.models import ModelSpec, build_network
    from raydistill.loop import CrossEntropy, train_step
    from raydistill.training import teacher_schedule

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    tcfg = TeacherConfig(arch=config["arch"], num_workers=world, zero_stage=config["zero_stage"],
                         batch_size=config["batch"])
    torch.manual_seed(0)
    net = build_network(ModelSpec(config["arch"], 10, (1, 8, 8), config["image_size"]))
    total = config["steps"] + config["warmup"]
    engine = sharding.wrap(net, sharding.deepspeed_config(tcfg, world), teacher_schedule(tcfg, total))
    batches = _batches(total, config["batch"], config["image_size"], seed=rank)
    loss = CrossEntropy()
    secs = _timed(lambda x, y: train_step(engine, loss, {"image": x, "label": y}), batches, config["warmup"])
    samples = config["steps"] * config["batch"] * world
    secs = max(sharding.gather_counts(int(secs * 1e6))) / 1e6  # the slowest rank sets the pace
    metrics = {"samples_per_s": samples / secs,
               "state_bytes_per_rank": sharding.gather_counts(sharding.state_bytes(engine))}
    # Train V2 hands the driver only metrics that came with a checkpoint: rank 0 attaches one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def ours(args, workers: int, zero_stage: int, cores: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    threads = max(1, cores // workers)
    config = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "zero_stage": zero_stage, "threads": threads}
    trainer = TorchTrainer(
        ours_worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cores / workers}),
        run_config=RunConfig(name=f"bench-{workers}w-z{zero_stage}", storage_path=tempfile.mkdtemp()),
    )
    return trainer.fit().metrics


def main() -> None:
    bench = Bench("train_throughput", __doc__, repeats=(3, 2),
                  target="1 worker >= 0.85x the bare PyTorch loop; per-rank state at 2 workers <= 0.55x of 1 worker")
    parser = bench.parser
    parser.add_argument("--arch", default="resnet10t", help="timm architecture (the demo teacher by default)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="micro-batch per worker")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run (at most 20 with --quick)")
    parser.add_argument("--warmup", type=int, default=5)
    args = bench.parse()
    if args.quick:
        args.steps = min(args.steps, 20)
    cores = os.cpu_count() or 2

    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    variants = {
        "bare PyTorch loop": lambda: bare(args, cores),
        "ours, 1 worker, ZeRO off": lambda: ours(args, 1, 0, cores),
        "ours, 1 worker, ZeRO-3": lambda: ours(args, 1, 3, cores),
        "ours, 2 workers, ZeRO-3": lambda: ours(args, 2, 3, cores),
    }
    try:
        runs = interleave(variants, args.repeats)
    finally:
        ray.shutdown()
    rows = {name: best(found, "samples_per_s") for name, found in runs.items()}
    spread = {name: [round(r["samples_per_s"], 1) for r in found] for name, found in runs.items()}

    base = rows["bare PyTorch loop"]["samples_per_s"]
    print(f"\n{args.arch} at {args.image_size}x{args.image_size}, micro-batch {args.batch}, "
          f"{args.steps} timed steps, {cores} cores, best of {args.repeats}\n")
    print(f"{'':28} {'samples/s':>10} {'vs bare':>8} {'state MB per rank':>20}   all runs")
    for name, row in rows.items():
        mb = ", ".join(f"{b / 2**20:.1f}" for b in row["state_bytes_per_rank"])
        runs_text = " ".join(f"{v:.0f}" for v in spread[name])
        print(f"{name:28} {row['samples_per_s']:10.0f} {row['samples_per_s'] / base:7.2f}x {mb:>20}   {runs_text}")

    speed_ratio = rows["ours, 1 worker, ZeRO off"]["samples_per_s"] / base
    one = rows["ours, 1 worker, ZeRO-3"]["state_bytes_per_rank"][0]
    two = max(rows["ours, 2 workers, ZeRO-3"]["state_bytes_per_rank"])
    state_ratio = two / one
    samples_per_s = {k: round(v["samples_per_s"], 1) for k, v in rows.items()}
    bench.finish(
        met=speed_ratio >= 0.85 and state_ratio <= 0.55,
        figures={
            "arch": args.arch, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
            "cores": cores, "repeats": args.repeats,
            "samples_per_s": samples_per_s,
            "samples_per_s_all_runs": spread,
            "state_bytes_per_rank": {k: v["state_bytes_per_rank"] for k, v in rows.items()},
            "one_worker_vs_bare": speed_ratio,
            "state_two_vs_one_worker": state_ratio,
            "one_worker_zero3_vs_bare": rows["ours, 1 worker, ZeRO-3"]["samples_per_s"] / base,
        },
        compare=samples_per_s,
        unit="samples/s (best run)",
    )


if __name__ == "__main__":
    main()
