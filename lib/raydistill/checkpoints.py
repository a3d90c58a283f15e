"""Resumable teacher checkpoints in safetensors: every ZeRO-3 rank writes its own shard.

DeepSpeed's own save_checkpoint writes pickles (torch.save) and reads them back with
weights_only=False, and our contract is that nothing is ever loaded with pickle. So each rank
writes the tensors it owns through DeepSpeed's tensor-fragment API (the documented way to read
and write ZeRO-partitioned parameters and optimizer state), and rank 0 writes the counters as
JSON. Ray Train gathers every rank's files into one checkpoint folder.

Layout of one checkpoint folder:
    state.json                    step, restarts, world size, ZeRO stage, LR-scheduler state,
                                  and the sha256 of every shard
    shard-rank00000.safetensors   fp32 master weights, Adam moments and buffers of rank 0
    shard-rank00001.safetensors   ... of rank 1 (ZeRO-3 only: below stage 3 rank 0 holds all)

A shard whose bytes no longer match its recorded sha256 is refused; `load_first_good` then
falls back to an older kept checkpoint that every rank can read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from raydistill.artifacts import sha256
from raydistill.sharding import is_fragment_mapped, link_optimizer_state, zero3_master_partitions

STATE_FILE = "state.json"
ADAM_STATE = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded here: unreadable, or written by a differently sharded run."""


def shard_file(rank: int) -> str:
    return f"shard-rank{rank:05d}.safetensors"


def _writes_shard(engine, rank: int) -> bool:
    return engine.zero_optimization_stage() == 3 or rank == 0


def _inner_optimizer(engine):
    """The torch (or DeepSpeed CPU) Adam that owns the step counters."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _param_tensors(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights and Adam moments this rank must save (a collective below ZeRO-3)."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_get_local_fp32_param,
        safe_get_local_optimizer_state,
    )

    stage = engine.zero_optimization_stage()
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if stage == 3:
            param = safe_get_local_fp32_param(p)
            moments = {key: safe_get_local_optimizer_state(p, key) for key in ADAM_STATE}
        elif is_fragment_mapped(p):  # ZeRO-1/2, or bf16 without ZeRO: fragments of a flat buffer
            param = safe_get_full_fp32_param(p)
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_STATE}
        else:  # fp32 without ZeRO: the plain torch optimizer owns the parameter
            state = _inner_optimizer(engine).state.get(p, {})
            param, moments = p.detach(), {key: state.get(key) for key in ADAM_STATE}
        out[f"param/{name}"] = param
        out.update({f"{key}/{name}": value for key, value in moments.items()})
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items() if v is not None}


def _optimizer_step(engine) -> int:
    for state in _inner_optimizer(engine).state.values():
        step = state.get("step")
        if step is not None:
            return int(step.item() if torch.is_tensor(step) else step)
    return 0


def save(engine, directory: Path, *, rank: int, world_size: int, step: int, counters: dict) -> None:
    """Write this rank's part of a checkpoint into `directory` (every rank must call this: the
    shards' hashes are gathered to rank 0, which records them in state.json)."""
    tensors = _param_tensors(engine)
    # Buffers (BatchNorm statistics) are replicated, not partitioned: each shard carries them.
    tensors.update({f"buffer/{n}": b.detach().cpu().contiguous() for n, b in engine.module.named_buffers()})
    mine = {}
    if _writes_shard(engine, rank):
        save_file(tensors, str(directory / shard_file(rank)))
        mine[shard_file(rank)] = sha256(directory / shard_file(rank))
    hashes = [mine] * world_size
    if world_size > 1:
        dist.all_gather_object(hashes, mine)
    if rank == 0:
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        state = {"step": step, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
                 "optimizer_step": _optimizer_step(engine), "lr_scheduler": scheduler,
                 "lr": [group["lr"] for group in engine.optimizer.param_groups],
                 "shards": {k: v for h in hashes for k, v in h.items()}, **counters}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def read_state(directory: Path) -> dict:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} has no readable {STATE_FILE} ({err})") from None


def load(engine, directory: Path, *, rank: int, world_size: int, verified: tuple | None = None) -> dict:
    """Restore weights, Adam moments, step counters and LR schedule; returns state.json.
    `verified`: (state, shard path) already read and checked (load_first_good)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state = verified[0] if verified else read_state(directory)
    stage = engine.zero_optimization_stage()
    if state["zero_stage"] != stage or (stage == 3 and state["world_size"] != world_size):
        raise CheckpointError(
            f"checkpoint {directory} was written by {state['world_size']} ranks with ZeRO-{state['zero_stage']}; "
            f"this run has {world_size} ranks with ZeRO-{stage}: start a new run name to train from scratch"
        )
    path = verified[1] if verified else _verified_shard(directory, state, rank, stage)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint shard {path} is unreadable ({err})") from None
    _ensure_optimizer_state(engine)
    for name, p in engine.module.named_parameters():
        saved = {key: tensors.get(f"{key}/{name}") for key in ("param", *ADAM_STATE)}
        if stage == 3:
            _set_local(engine, p, saved)
        elif is_fragment_mapped(p):
            safe_set_full_fp32_param(p, saved["param"].to(p.device))
            for key in ADAM_STATE:
                if saved[key] is not None:
                    safe_set_full_optimizer_state(p, saved[key].to(p.device), key)
        else:
            p.data.copy_(saved["param"])
            for key in ADAM_STATE:
                _inner_optimizer(engine).state[p][key].copy_(saved[key])
    if stage != 3 and hasattr(engine.optimizer, "update_lp_params"):
        engine.optimizer.update_lp_params()  # the 16-bit working copies follow the fp32 masters
    for name, buf in engine.module.named_buffers():
        buf.data.copy_(tensors[f"buffer/{name}"])
    _restore_counters(engine, state)
    return state


def _verified_shard(directory: Path, state: dict, rank: int, stage: int) -> Path:
    """This rank's shard, once its bytes match the sha256 in state.json (checkpoints written
    before hashes were recorded are taken as they are)."""
    path = directory / shard_file(rank if stage == 3 else 0)
    recorded = state.get("shards", {}).get(path.name)
    if not path.is_file():
        raise CheckpointError(f"checkpoint shard {path} is missing")
    if recorded is not None and sha256(path) != recorded:
        raise CheckpointError(f"checkpoint shard {path} is corrupt: its sha256 differs from the one in {STATE_FILE}")
    return path


def load_first_good(engine, candidates: list, *, rank: int, world_size: int,
                    say: Callable[[str], None] = print) -> dict:
    """Load the newest of `candidates` (newest first, the same list on every rank; each a folder
    or anything with `as_directory()`, such as a ray.train.Checkpoint, opened one at a time)
    that every rank can read and verify; rank 0 says which were skipped and why. The ranks
    agree on each candidate through one all_reduce, so they never resume from different steps,
    and no rank leaves the loop early whatever its error."""
    stage = engine.zero_optimization_stage()
    skipped: list[str] = []
    for candidate in candidates:
        opened = candidate.as_directory() if hasattr(candidate, "as_directory") else contextlib.nullcontext(candidate)
        with opened as directory:
            directory, problem = Path(directory), None
            try:
                state = read_state(directory)
                shard = _verified_shard(directory, state, rank, stage)
            except Exception as err:  # unreadable, corrupt, vanished: this candidate is out
                problem = str(err) or type(err).__name__
            if _everyone(problem is None, engine, world_size):
                if skipped and rank == 0:
                    say(f"{skipped[0]}; falling back to {directory.name}, the newest kept checkpoint every "
                        "rank can read")
                return load(engine, directory, rank=rank, world_size=world_size, verified=(state, shard))
            skipped.append(f"{directory.name} is unusable ({problem or 'a shard of another rank failed its check'})")
    raise CheckpointError(f"none of the {len(candidates)} kept checkpoints is usable on every rank "
                          f"(newest: {skipped[0] if skipped else 'none'}); start a new run name to train from scratch")


def _everyone(ok: bool, engine, world_size: int) -> bool:
    """Whether `ok` holds on every rank (one all_reduce)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=getattr(engine, "device", "cpu"))
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _ensure_optimizer_state(engine) -> None:
    """Adam creates its moments on the first step; a restore needs somewhere to put them."""
    inner = _inner_optimizer(engine)
    torch_adam = isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
    # ZeRO-3 hands its flat fp32 partitions to the optimizer only for the length of a step.
    owners = [p for group in inner.param_groups for p in group["params"]]
    owners += zero3_master_partitions(engine.optimizer)
    for p in owners:
        if not inner.state.get(p):
            inner.state[p] = {"step": torch.tensor(0.0) if torch_adam else 0,  # CPU Adam counts in ints
                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    link_optimizer_state(engine.optimizer)


def _set_local(engine, p, saved: dict) -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    safe_set_local_fp32_param(p, saved["param"].to(p.ds_tensor.device))
    # The working partition (what forward gathers) is a separate copy of the fp32 master.
    p.ds_tensor.data.copy_(saved["param"].to(p.ds_tensor.dtype))
    for key in ADAM_STATE:
        if saved[key] is not None:
            safe_set_local_optimizer_state(p, saved[key].to(p.ds_tensor.device), key)


def _restore_counters(engine, state: dict) -> None:
    for opt_state in _inner_optimizer(engine).state.values():
        if "step" in opt_state:
            step = opt_state["step"]
            opt_state["step"] = torch.full_like(step, state["optimizer_step"]) if torch.is_tensor(step) \
                else state["optimizer_step"]
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    # A scheduler's state sets the *next* learning rate; the one the next step uses is restored here.
    for group, lr in zip(engine.optimizer.param_groups, state["lr"], strict=True):
        group["lr"] = lr
    engine.global_steps = state["step"]
