"""Compression: physical channel pruning that reloads from safetensors, ONNX that matches
torch within a stated tolerance, int8 that keeps a trained model's predictions, the report,
and hash-checked loading of every artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raydistill import compress, report
from raydistill.artifacts import ArtifactError, load_weights, save_weights, sha256
from raydistill.models import ModelSpec, build_network, count_params, load_network, recalibrate_batchnorm

SPEC = ModelSpec("test_efficientnet", 10, (1, 8, 8), 16)
ONNX_TOLERANCE = 1e-4  # fp32 ONNX Runtime vs torch, max |logit| difference


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * 255 / 16).astype(np.uint8)[:, None]
    return images, d.target.astype(np.int64)


@pytest.fixture(scope="module")
def trained(digits):
    """test_efficientnet after a few hundred plain steps on 1,500 digits (a few seconds)."""
    from raydistill.models import to_model_input

    images, labels = digits
    torch.manual_seed(0)
    net = build_network(SPEC)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3)
    x_all = to_model_input(torch.from_numpy(images[:1500]).float() / 255, 16)
    y_all = torch.from_numpy(labels[:1500])
    for epoch in range(4):
        order = torch.randperm(1500)
        for i in range(0, 1500, 64):
            idx = order[i : i + 64]
            net.train()
            loss = torch.nn.functional.cross_entropy(net(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    recalibrate_batchnorm(net, images[:1500], 16)
    return net


def test_pruning_removes_parameters_and_the_file_rebuilds(tmp_path):
    torch.manual_seed(0)
    net = build_network(SPEC).eval()
    before = count_params(net)
    compress.prune_channels(net, 0.5, 16, 1)
    after = count_params(net)
    assert after < 0.5 * before
    assert net.get_classifier().out_features == 10
    path = save_weights(tmp_path / "p.safetensors", net.state_dict(), {**SPEC.to_meta(), "pruned": "true"})
    state, meta = load_weights(path, sha256(path))
    rebuilt = load_network(state, meta).eval()
    assert count_params(rebuilt) == after
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), rebuilt(x))
    # without the flag the stored shapes do not fit the arch: refused, not silently changed
    plain_meta = {**meta, "pruned": "false"}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_network(state, plain_meta)


def test_plain_cnn_prunes_rebuilds_and_exports_to_a_few_fused_operators(tmp_path, digits):
    import onnx

    images, _ = digits
    spec = ModelSpec("plain_cnn_s", 10, (1, 8, 8), 16)
    torch.manual_seed(0)
    net = compress.prune_channels(build_network(spec), 0.5, 16, 1)
    recalibrate_batchnorm(net, images[:256], 16)
    path = save_weights(tmp_path / "p.safetensors", net.state_dict(), {**spec.to_meta(), "pruned": "true"})
    rebuilt = load_network(*load_weights(path, sha256(path))).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), rebuilt(x))
    onnx_path = compress.export_onnx(rebuilt, spec, tmp_path / "p.onnx")
    compress.check_onnx(rebuilt, spec, onnx_path, images[:64], ONNX_TOLERANCE)
    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node]
    # BatchNorm folded into the convs; the 8 -> 16 resize is one op with constant scales
    assert ops.count("Conv") == 4 and "BatchNormalization" not in ops and "Shape" not in ops
    int8 = compress.quantize_int8(onnx_path, tmp_path / "p.int8.onnx", images[:256])
    int8_ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "Relu" not in int8_ops  # quantized Relu folds into the integer conv


def test_onnx_matches_torch_within_tolerance(tmp_path, digits):
    images, _ = digits
    torch.manual_seed(0)
    net = compress.prune_channels(build_network(SPEC), 0.3, 16, 1)
    recalibrate_batchnorm(net, images[:256], 16)
    path = compress.export_onnx(net, SPEC, tmp_path / "s.onnx")
    check = compress.check_onnx(net, SPEC, path, images[:300], ONNX_TOLERANCE)
    assert check["max_abs_logit_diff"] <= ONNX_TOLERANCE and check["top1_agreement"] == 1.0
    # a dynamic batch: any batch size runs
    session = compress.onnx_session(path)
    assert compress.onnx_logits(session, images[:1]).shape == (1, 10)
    # a model that is not what was exported is caught
    other = build_network(SPEC).eval()
    with pytest.raises(RuntimeError, match="differs from torch"):
        compress.check_onnx(other, SPEC, path, images[:50], ONNX_TOLERANCE)


def test_int8_keeps_a_trained_students_predictions(tmp_path, trained, digits):
    images, labels = digits
    held_out_x, held_out_y = images[1500:], labels[1500:]
    fp32 = compress.export_onnx(trained, SPEC, tmp_path / "s.onnx")
    int8 = compress.quantize_int8(fp32, tmp_path / "s.int8.onnx", images[:512])
    acc32 = compress.onnx_accuracy(fp32, held_out_x, held_out_y)
    acc8 = compress.onnx_accuracy(int8, held_out_x, held_out_y)
    assert acc32 > 0.85
    assert acc8 >= acc32 - 0.03
    graph = int8.read_bytes()
    assert b"QuantizeLinear" in graph and b"DequantizeLinear" in graph
    # the int8 file holds int8 weights: smaller than the fp32 one
    assert int8.stat().st_size < fp32.stat().st_size


def test_served_predictor_runs_the_onnx_files_like_torch(tmp_path, trained, digits):
    from raydistill.serving import Predictor, ServedModel

    images, _ = digits
    weights = save_weights(tmp_path / "s.safetensors", trained.state_dict(), SPEC.to_meta())
    fp32 = compress.export_onnx(trained, SPEC, tmp_path / "s.onnx")
    int8 = compress.quantize_int8(fp32, tmp_path / "s.int8.onnx", images[:512])
    pixels = (images[1500:] / 255.0).astype(np.float32)

    def served(onnx=None):
        files = (str(onnx), sha256(onnx)) if onnx else ()
        return Predictor(ServedModel(str(weights), sha256(weights), *files), threads=1)

    by_torch, by_fp32, by_int8 = served()(pixels), served(fp32)(pixels), served(int8)(pixels)
    assert served(int8).platform == "onnxruntime_onnx" and served().platform == "pytorch_torchscript"
    np.testing.assert_allclose(by_fp32, by_torch, atol=1e-5)
    np.testing.assert_allclose(by_int8.sum(axis=1), 1.0, atol=1e-5)
    assert (by_int8.argmax(1) == by_torch.argmax(1)).mean() > 0.95
    with pytest.raises(ArtifactError, match="sha256"):  # a replica refuses a file that changed
        Predictor(ServedModel(str(weights), sha256(weights), str(int8), sha256(fp32)), threads=1)


def test_finetune_after_pruning_recovers_accuracy(trained, digits, tmp_path):
    import copy

    from raydistill.config import load_config
    from raydistill.data import store_arrays
    from raydistill.models import accuracy

    images, labels = digits
    teacher = trained
    pruned = compress.prune_channels(copy.deepcopy(trained), 0.5, 16, 1)
    recalibrate_batchnorm(pruned, images[:1500], 16)
    acc_pruned = accuracy(pruned, images[1500:], labels[1500:], 16)
    train = store_arrays(tmp_path, {"train": (images[:1500], labels[:1500])}).train
    compress.finetune(pruned, teacher, train, image_size=16, epochs=2, batch_size=64,
                      lr=2e-3, temperature=4.0, alpha=0.5, seed=0, augment=load_config(None, ["data.augment.gaussian_noise.std=0"]).data.augment_spec())
    acc_tuned = accuracy(pruned, images[1500:], labels[1500:], 16)
    assert acc_tuned > acc_pruned
    assert acc_tuned > 0.8


def test_onnx_artifacts_are_hash_checked(tmp_path, trained):
    path = compress.export_onnx(trained, SPEC, tmp_path / "s.onnx")
    digest = sha256(path)
    compress.onnx_session(path, digest)  # intact: loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="sha256 differs"):
        compress.onnx_session(path, digest)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        compress.onnx_session(path)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit, same length
    with pytest.raises(ArtifactError, match="sha256 differs"):
        compress.onnx_session(path, digest)
    with pytest.raises(ArtifactError, match="missing"):
        compress.onnx_session(tmp_path / "absent.onnx", digest)


def test_changed_safetensors_of_the_same_length_is_refused(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", build_network(SPEC).state_dict(), SPEC.to_meta())
    digest = sha256(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a weight byte: the file still parses, only the hash can tell
    path.write_bytes(bytes(data))
    load_weights(path)  # parses fine...
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_weights(path, digest)  # ...but the recorded hash refuses it


def test_report_writes_markdown_and_chart(tmp_path):
    rows = {name: {"accuracy": acc, "params": p, "file_bytes": 4 * p, "latency_ms_p50": lat,
                   "latency_ms_p99": 2 * lat, "throughput_per_s": 1000 / lat}
            for name, acc, p, lat in (("teacher", 0.98, 4_900_000, 2.0), ("student", 0.975, 50_000, 0.5),
                                      ("student int8 (ONNX)", 0.97, 50_000, 0.1))}
    summary = {"arch": "test_efficientnet", "teacher_arch": "resnet10t", "retention": 0.975 / 0.98,
               "params_ratio": 98.0, "kd": {"T": 4.0, "alpha": 0.5, "mode": "online"},
               "pruning": {"status": "kept"}, "onnx": {"max_abs_logit_diff": 1e-6, "tolerance": 1e-4}}
    md, png = report.write_report(tmp_path, rows, summary)
    text = md.read_text()
    assert "| student int8 (ONNX) | 0.9700 | 0.990 | 50,000 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(rows)  # summary-ready


def test_profile_reports_latency_percentiles_and_throughput():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with report.one_thread():
        figures = report.profile(report.torch_runner(net), (1, 8, 8), runs=20, throughput_runs=3)
    assert 0 < figures["latency_ms_p50"] <= figures["latency_ms_p99"]
    assert figures["throughput_per_s"] > 0
