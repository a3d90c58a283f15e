"""DeepSpeed ZeRO: config from our typed config, wrapping a model, and reading its shards.

The model code knows nothing of DeepSpeed; this module is the only place that does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raydistill.config import TeacherConfig


def _offload(device: str, nvme_path: str | None) -> dict:
    out: dict = {"device": device, "pin_memory": True}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


def deepspeed_config(tcfg: TeacherConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for one teacher run (fp32 on CPU, bf16/fp16 autocast on GPU).
    It names no LR scheduler: wrap() gives the engine loop.lr_schedule, the one every
    trainer uses."""
    zero: dict = {"stage": tcfg.zero_stage}
    if tcfg.zero_stage == 3:
        # Partition every tensor: the default keeps tensors under 1e5 elements whole on each
        # rank, which for small conv nets would mean hardly anything is sharded.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    if tcfg.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(tcfg.offload_optimizer, tcfg.nvme_path)
    if tcfg.offload_param != "none":
        zero["offload_param"] = _offload(tcfg.offload_param, tcfg.nvme_path)
    dtype = tcfg.dtype_name
    return {
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum_steps,
        "train_batch_size": tcfg.batch_size * tcfg.grad_accum_steps * world_size,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW needs no JIT-built op; offloaded state uses DeepSpeed's CPU Adam,
            # which is several times faster on the host than torch's.
            "params": {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay,
                       "torch_adam": tcfg.offload_optimizer == "none"},
        },
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": zero,
        # 16-bit runs use DeepSpeed's torch_autocast mode: fp32 weights, each op in bf16/fp16
        # where torch.autocast deems it safe, ZeRO's gathers and reductions of conv/linear
        # weights in the 16-bit type (fp16 adds a gradient scaler). Its bf16 mode (16-bit
        # weights) left BatchNorm's running stats in fp32 under ZeRO-3 and failed on the first
        # step of any BN network (stages 0-2 not checked); without ZeRO it was also 0.59x as
        # fast on a 1B ViT (bench/gpu_teacher.py, H200).
        "torch_autocast": {"enabled": dtype != "fp32", "dtype": "float16" if dtype == "fp16" else "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def validate(ds_config: dict) -> None:
    """Check our DeepSpeed config with DeepSpeed's own schema for the ZeRO section, in the
    driver: a key DeepSpeed would reject fails here rather than in every worker."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**ds_config["zero_optimization"])
    except ValidationError as err:
        raise ValueError(f"DeepSpeed rejects the ZeRO config: {err.errors()[0]['msg']}") from None


# ---- DeepSpeed internals --------------------------------------------------------------------
# Everything this project reads or sets inside DeepSpeed that its public API (deepspeed.utils'
# tensor-fragment functions, engine.*) does not offer, in one place; checked against
# deepspeed 0.19.8 (constraints.txt). An upgrade that moves one breaks here, by name.


def is_fragment_mapped(param) -> bool:
    """Whether the parameter is a view into a flat fp32 buffer (ZeRO-1/2, or bf16 without ZeRO),
    so that its master weights and moments are reached through the tensor-fragment API."""
    return hasattr(param, "_hp_mapping")


def zero3_master_partitions(optimizer) -> list:
    """ZeRO-3's flat fp32 master partitions (the optimizer sees them only during a step)."""
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", []))


def zero12_master_partitions(optimizer) -> list:
    """ZeRO-1/2's flat fp32 master partitions."""
    return list(getattr(optimizer, "single_partition_of_fp32_groups", []))


def link_optimizer_state(optimizer) -> None:
    """ZeRO-1/2 and bf16 link each parameter's view of the Adam moments only once the moments
    exist; after creating them by hand (a restore), link them now."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _skip_inference_only_ops() -> None:
    """Never JIT-build DeepSpeed's shared-memory comm op.

    DeepSpeed's CPU backend compiles it with gcc on every new environment (30-60 s here, and
    again whenever torch's extension cache looks stale), yet only its inference_all_reduce uses
    it: ZeRO training talks to the process group (gloo) directly. Marking it incompatible is the
    switch DeepSpeed itself consults before building (deepspeed.comm.torch.build_shm_op).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _avoid_onednn_16bit_conv_on_cpu(ds_config: dict) -> None:
    """16-bit autocast on the CPU: run convolutions in ATen's own kernels, not oneDNN's.

    oneDNN's bf16 convolution backward (torch 2.14.1, on CPUs with avx512_bf16/AMX) leaves the
    weight gradient of kernel taps that see only padding uninitialised: e.g. a 3x3, stride-2
    conv over a 1x1 map (resnet's last stage at 16x16 input). Those taps get whatever the
    allocator hands back: zeros in a fresh process, garbage (NaN, 1e31) once memory is
    reused, so two identical runs in one process, or a run and its resume, diverge. ATen's
    kernels zero them. GPUs (cuDNN) and fp32 runs are not affected; this setting is
    process-wide, and the processes that train in 16-bit on CPU do nothing else."""
    if ds_config.get("torch_autocast", {}).get("enabled") and not torch.cuda.is_available():
        torch.backends.mkldnn.enabled = False


def wrap(model: nn.Module, ds_config: dict, lr_scheduler, params: list[dict] | None = None):
    """deepspeed.initialize on an already-initialised process group (Ray Train set it up).
    lr_scheduler(optimizer) -> the LR scheduler (training.teacher_schedule): DeepSpeed steps it
    with the optimizer, at accumulation boundaries. `params`: parameter groups
    (transfer.param_groups); default, all parameters in one."""
    _skip_inference_only_ops()
    _avoid_onednn_16bit_conv_on_cpu(ds_config)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params or model.parameters(), config=ds_config, dist_init_required=False,
        lr_scheduler=lr_scheduler,
    )
    return engine


def local_param_count(engine) -> int:
    """Parameters this rank holds: its own ZeRO-3 partition, or the full model below stage 3."""
    total = 0
    for param in engine.module.parameters():
        shard = getattr(param, "ds_tensor", None)
        total += shard.numel() if shard is not None else param.numel()
    return total


def state_bytes(engine) -> int:
    """Bytes of parameters and optimizer state this rank holds: its ZeRO partitions of the
    working weights, of the fp32 master weights and of the Adam moments (each tensor once)."""
    tensors = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    optimizer = engine.optimizer
    tensors += zero3_master_partitions(optimizer) + zero12_master_partitions(optimizer)
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    seen: dict[int, int] = {}
    for t in tensors:
        if t.numel():
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def full_param_count(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def gather_counts(value: int) -> list[int]:
    """Every rank's value, in rank order (a collective: all ranks must call it)."""
    if not dist.is_initialized():
        return [value]
    # NCCL moves only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.long, device=device))
    return [int(t.item()) for t in out]


def consolidated_state_dict(engine) -> dict | None:
    """Full weights gathered onto rank 0 (None elsewhere). All ranks must call it."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a DeepSpeed internal, see above
        return state if dist.get_rank() == 0 else None
    return engine.module.state_dict() if dist.get_rank() == 0 else None

