"""DeepSpeed ZeRO: config from our typed config, wrapping a model, and reading its shards.

The model code knows nothing of DeepSpeed; this module is the only place that does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raydistill.config import TeacherConfig


def deepspeed_config(tcfg: TeacherConfig, world_size: int, total_steps: int) -> dict:
    """The DeepSpeed JSON config for one teacher run (fp32 on CPU, bf16 on GPU)."""
    warmup = int(total_steps * tcfg.warmup_fraction)
    zero: dict = {"stage": tcfg.zero_stage}
    if tcfg.zero_stage == 3:
        # Partition every tensor: the default keeps tensors under 1e5 elements whole on each
        # rank, which for small conv nets would mean hardly anything is sharded.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": tcfg.batch_size * world_size,
        # torch's AdamW: no JIT-built fused op is needed on CPU.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(1, total_steps),
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.01,
                "cos_min_ratio": 0.01,
            },
        },
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": tcfg.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _skip_inference_only_ops() -> None:
    """Never JIT-build DeepSpeed's shared-memory comm op.

    DeepSpeed's CPU backend compiles it with gcc on every new environment (30-60 s here, and
    again whenever torch's extension cache looks stale), yet only its inference_all_reduce uses
    it: ZeRO training talks to the process group (gloo) directly. Marking it incompatible is the
    switch DeepSpeed itself consults before building (deepspeed.comm.torch.build_shm_op).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def wrap(model: nn.Module, ds_config: dict):
    """deepspeed.initialize on an already-initialised process group (Ray Train set it up)."""
    _skip_inference_only_ops()
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, dist_init_required=False
    )
    return engine


def local_param_count(engine) -> int:
    """Parameters this rank holds: its own ZeRO-3 partition, or the full model below stage 3."""
    total = 0
    for param in engine.module.parameters():
        shard = getattr(param, "ds_tensor", None)
        total += shard.numel() if shard is not None else param.numel()
    return total


def full_param_count(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def gather_counts(value: int) -> list[int]:
    """Every rank's value, in rank order (a collective: all ranks must call it)."""
    if not dist.is_initialized():
        return [value]
    out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.long))
    return [int(t.item()) for t in out]


def consolidated_state_dict(engine) -> dict | None:
    """Full weights gathered onto rank 0 (None elsewhere). All ranks must call it."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if dist.get_rank() == 0 else None
    return engine.module.state_dict() if dist.get_rank() == 0 else None

