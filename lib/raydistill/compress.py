"""Compression after distillation: structured pruning with a short KD fine-tune, ONNX export
checked against torch with ONNX Runtime, and static int8 quantization for CPU serving.

Pruning removes channels physically (torch-pruning follows the dependency graph through
residuals, depthwise convs and squeeze-excite), so parameters and FLOPs actually drop; the
pruned shapes live in the safetensors file and `models.load_network` rebuilds them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raydistill.artifacts import atomic_write
from raydistill.models import Classifier, ModelSpec, recalibrate_batchnorm

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


# ---- structured pruning -----------------------------------------------------------------


def prune_channels(net: nn.Module, ratio: float, image_size: int, in_chans: int) -> nn.Module:
    """Remove `ratio` of the output channels of every prunable layer (lowest L2 norm first),
    in place. The classifier keeps its outputs (one per class)."""
    import torch_pruning as tp

    net.eval()
    example = torch.zeros(1, in_chans, image_size, image_size)
    classifier = net.get_classifier() if hasattr(net, "get_classifier") else None
    pruner = tp.pruner.MagnitudePruner(
        net, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[classifier] if isinstance(classifier, nn.Module) else [],
    )
    pruner.step()
    return net


def finetune(net: nn.Module, teacher: nn.Module, split, *, image_size: int, epochs: int, batch_size: int,
             lr: float, temperature: float, alpha: float, seed: int, augment: list[dict],
             num_classes: int | None = None, device: str = "cpu") -> nn.Module:
    """A short KD fine-tune in this process (a few dozen steps on CPU), through loop.fit: the
    pruned student learns back from the teacher on freshly augmented views (the data stage's
    own augment) of the stored training split (`data.SplitRef`), read a row group at a time.
    Cosine decay from `lr`, no warmup: the network is already trained."""
    from raydistill.augment import augment_batch, epoch_groups, rebatch
    from raydistill.kd import Trainee
    from raydistill.loop import Distillation, TorchEngine, fit
    from raydistill.training import StepPlan

    if epochs == 0:
        return net
    plan = StepPlan.of(len(split), 1, batch_size, epochs)
    net.to(device)
    teacher.to(device).eval()
    engine = TorchEngine(Trainee(net), lr=lr, weight_decay=0.01, total_steps=plan.total_steps)  # AdamW's default decay

    def micro_batches():
        for epoch in range(epochs):
            # epoch offset 1000: fresh views, unlike any the student saw in distillation
            views = (augment_batch({"image": b.images, "label": b.labels, "id": b.ids}, seed=seed,
                                   epoch=1000 + epoch, image_size=image_size, augment=augment,
                                   num_classes=num_classes)
                     for b in map(split.read, epoch_groups(split, seed, 1000 + epoch)))
            # Full batches across row groups: one input shape, every row used but an epoch's
            # tail. y: class ids, or soft labels (B, classes) when the augmentation mixes images.
            for x, y in rebatch(((v["image"], v["label"]) for v in views), batch_size):
                yield {"image": torch.from_numpy(x).to(device), "label": torch.from_numpy(y).to(device)}

    fit(engine, Distillation(temperature, alpha, teacher=teacher), enumerate(micro_batches(), start=1), plan,
        after_step=lambda step, epoch_loss: None)
    recalibrate_batchnorm(net, split.head(512).images, image_size)
    teacher.cpu()
    return net.cpu()  # exported and measured on the CPU


# ---- ONNX -----------------------------------------------------------------------------


def export_onnx(net: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """The served classifier (raw pixels on 0..1 in, logits out; resize + normalise inside)
    as ONNX with a dynamic batch dimension.

    TorchScript-based exporter (dynamo=False): it exports these small convnets in about a
    second, where the torch.export path takes ~15 s on 2 CPU cores, too much for the demo.
    """
    model = Classifier(net, spec).eval()
    example = torch.rand(2, *spec.input_shape)

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=17,
                dynamo=False,
            )

    return atomic_write(path, export)


def onnx_session(path: Path, sha256: str | None = None, threads: int = 1):
    """An ONNX Runtime CPU session; with `sha256`, only for a file that still has that hash."""
    import onnxruntime as ort

    from raydistill.artifacts import ArtifactError, verify_file

    path = verify_file(path, sha256)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidProtobuf types for bad files
        raise ArtifactError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0][:200]})") from None


def onnx_logits(session, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of an ONNX classifier on uint8 (N, C, H, W) images."""
    outs = [session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch].astype(np.float32) / 255.0})[0]
            for i in range(0, len(images), batch)]
    return np.concatenate(outs)


def check_onnx(net: nn.Module, spec: ModelSpec, path: Path, images: np.ndarray, tolerance: float) -> dict:
    """ONNX Runtime against torch on the same images: the largest logit difference must stay
    within `tolerance`, else the export is refused."""
    model = Classifier(net, spec).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(images).float() / 255.0).numpy()
    got = onnx_logits(onnx_session(path), images)
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    if not diff <= tolerance:
        raise RuntimeError(f"ONNX export of the student differs from torch: max |logit diff| {diff:.3g} "
                           f"> tolerance {tolerance:.3g}")
    return {"max_abs_logit_diff": diff, "tolerance": tolerance, "top1_agreement": agree, "images": int(len(images))}


class _Calibration:
    """onnxruntime.quantization CalibrationDataReader over clean training images."""

    def __init__(self, images: np.ndarray, batch: int = 64):
        self.batches = iter([images[i : i + batch].astype(np.float32) / 255.0 for i in range(0, len(images), batch)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> Path:
    """Static int8 quantization (QDQ, per-tensor int8 weights, uint8 activations calibrated
    on clean training images): convolutions and the classifier run as integer kernels on CPU.

    Choices measured on the demo's distilled test_efficientnet (digits, 359 test images):
    quantizing every op (ORT's default) also requantizes the SiLU / squeeze-excite gates
    (Sigmoid, Mul), so only Conv, Gemm and Relu are quantized; per-channel weights then still
    lost 5.6 points (0.975 -> 0.919) where per-tensor lost 0.6 (-> 0.969). Relu is included for
    the plain CNN students: a quantized Relu folds into the integer conv (its output range
    starts at 0), which drops a Dequantize/Relu/Quantize triple per layer, about a fifth of
    plain_cnn_xs's batch-1 time (48 -> 42 us measured)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_name(int8_path.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        return atomic_write(int8_path, lambda tmp: quantize_static(
            str(prepared), str(tmp), _Calibration(calibration_images), quant_format=QuantFormat.QDQ,
            per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm", "Relu"],
        ))
    finally:
        prepared.unlink(missing_ok=True)


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return 0.0
    return float((onnx_logits(onnx_session(path), images).argmax(1) == labels).mean())


