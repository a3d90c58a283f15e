"""Evaluation over a stored split, streamed a row group at a time and sharded across ranks.

No process holds a whole split: each rank reads every world-th row group, counts correct
predictions and sums the cross-entropy, and the ranks add their counts with one all_reduce.
Every forward has EVAL_BATCH rows (the last padded with blank images whose results are dropped):
one input shape, and under ZeRO-3, where every forward gathers parameters collectively, as
many forwards on every rank.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.data import SplitRef
from raydistill.models import device_of, to_model_input

EVAL_BATCH = 128  # rows per evaluation forward, the same for every chunk (the last is padded)


@torch.no_grad()
def split_metrics(net, split: SplitRef, image_size: int, rank: int = 0, world: int = 1) -> dict:
    """{"accuracy", "loss" (mean cross-entropy), "rows"} of `net` (a module, or any callable
    taking model inputs) on the split; with world > 1 every rank must call this together."""
    if hasattr(net, "eval"):
        net.eval()
    device = device_of(net)
    sums = torch.zeros(3, dtype=torch.float64)  # correct, summed loss, rows
    for images, labels, rows in split.chunks(EVAL_BATCH, rank, world):
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device).float() / 255.0, image_size)
        logits = net(x).float().cpu()[:rows]  # blank padding rows are dropped here
        target = torch.from_numpy(labels[:rows])
        sums += torch.tensor([float((logits.argmax(1) == target).sum()),
                              float(F.cross_entropy(logits, target, reduction="sum")) if rows else 0.0, float(rows)],
                             dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)  # gloo reduces CPU tensors; on NCCL the process group also has gloo
    correct, loss, rows = sums.tolist()
    return {"accuracy": correct / rows if rows else 0.0, "loss": loss / rows if rows else float("nan"),
            "rows": int(rows)}


def onnx_split_accuracy(path, split: SplitRef) -> float:
    """Top-1 accuracy of an exported ONNX classifier (raw pixels on 0..1 in) on the split."""
    from raydistill.compress import onnx_logits, onnx_session

    session = onnx_session(path)
    correct = total = 0
    for images, labels, rows in split.chunks(EVAL_BATCH):
        predicted = onnx_logits(session, images, batch=EVAL_BATCH)[:rows].argmax(1)
        correct += int((predicted == labels[:rows]).sum())
        total += rows
    return correct / total if total else 0.0
