"""Evaluation over a stored split, streamed a row group at a time and sharded across ranks.

No process holds a whole split: each rank reads every world-th row group, counts correct
predictions and sums the cross-entropy, and the ranks add their counts with one all_reduce.
Under ZeRO-3 every forward gathers parameters collectively, so every rank runs as many forwards
(a rank with fewer row groups runs a discarded one on a blank image to stay in step).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.data import SplitRef
from raydistill.models import device_of, to_model_input


@torch.no_grad()
def split_metrics(net, split: SplitRef, image_size: int, rank: int = 0, world: int = 1) -> dict:
    """{"accuracy", "loss" (mean cross-entropy), "rows"} of `net` (a module, or any callable
    taking model inputs) on the split; with world > 1 every rank must call this together."""
    if hasattr(net, "eval"):
        net.eval()
    device = device_of(net)
    sums = torch.zeros(3, dtype=torch.float64)  # correct, summed loss, rows
    for batch in split.batches(rank, world, padded=world > 1):
        images = batch.images if batch is not None else np.zeros((1, *split.data.shape), dtype=np.uint8)
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device).float() / 255.0, image_size)
        logits = net(x).float().cpu()
        if batch is None:
            continue
        target = torch.from_numpy(batch.labels)
        sums += torch.tensor([float((logits.argmax(1) == target).sum()),
                              float(F.cross_entropy(logits, target, reduction="sum")), float(len(target))],
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
    correct = rows = 0
    for batch in split.batches():
        predicted = onnx_logits(session, batch.images).argmax(1)
        correct += int((predicted == batch.labels).sum())
        rows += len(batch.labels)
    return correct / rows if rows else 0.0
