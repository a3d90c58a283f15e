"""A text model as ONNX (dynamic batch and sequence axes), then int8 with ONNX Runtime's
dynamic quantization (weights int8, activations quantized per call: the usual choice for
transformers, whose activation ranges vary too much for a static calibration). Each file is
checked against torch on the test split before it is kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from raydistill.artifacts import atomic_write

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "logits"


def export_onnx(model: torch.nn.Module, path: Path, max_length: int) -> Path:
    """The model as ONNX, then through ONNX Runtime's transformer optimizer: embeddings,
    attention, GELU and skip-LayerNorm become single fused ops. A small student is bound by
    per-op overhead at batch 1, so fusion cuts its latency by about a third; the logits stay
    equal to rounding (checked against torch by the caller)."""
    import tempfile

    from onnxruntime.transformers import optimizer

    from raydistill.text.models import TextLogits, is_qa_model

    wrapped = TextLogits(model).eval()
    example = tuple(torch.ones(2, min(16, max_length), dtype=torch.long) for _ in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes[OUTPUT] = {0: "batch", 1: "sequence"} if is_qa_model(model) else {0: "batch"}  # QA: (B, L, 2)
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(wrapped, example, str(raw), input_names=list(INPUTS), output_names=[OUTPUT],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        fused = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size)
        return atomic_write(path, lambda out: fused.save_model_to_file(str(out)))


def quantize_int8(fp32: Path, int8: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused ops (com.microsoft domain) defeat ONNX shape inference: their outputs are fp32.
    return atomic_write(int8, lambda tmp: quantize_dynamic(
        str(fp32), str(tmp), weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}))


def _padded(logits: np.ndarray, length: int) -> np.ndarray:
    """Per-token logits (B, l, 2) of a batch cut to its longest row, padded back to `length`
    (as masked padding: -1e4) so that batches of different lengths stack."""
    if logits.ndim < 3:
        return logits
    return np.pad(logits, ((0, 0), (0, length - logits.shape[1]), (0, 0)), constant_values=-1e4)


def onnx_logits(session, arrays: dict, batch: int = 64) -> np.ndarray:
    out = []
    n, full = arrays["input_ids"].shape
    for start in range(0, n, batch):
        rows = slice(start, start + batch)
        length = max(1, int(arrays["attention_mask"][rows].sum(1).max()))
        feed = {k: arrays[k][rows, :length].astype(np.int64) for k in INPUTS}
        out.append(_padded(session.run([OUTPUT], feed)[0], full))
    return np.concatenate(out)


def torch_logits(model: torch.nn.Module, arrays: dict, batch: int = 64) -> np.ndarray:
    from raydistill.text.models import TextLogits
    from raydistill.text.train import logits_of

    forward = TextLogits(model).eval()
    n, full = arrays["input_ids"].shape
    with torch.no_grad():
        return np.concatenate([_padded(logits_of(forward, arrays, slice(s, s + batch)).numpy(), full)
                               for s in range(0, n, batch)])


def check_export(expected: np.ndarray, got: np.ndarray, tolerance: float, what: str) -> dict:
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:
        raise RuntimeError(f"{what} differs from torch: max |logit diff| {diff:.3g} > tolerance {tolerance:.3g}")
    return {"max_abs_logit_diff": diff, "tolerance": tolerance,  # QA: start and end positions agreeing
            "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()), "rows": int(len(got))}


def session_runner(session):
    """feed dict -> logits, for latency measurements."""
    return lambda feed: session.run([OUTPUT], feed)
