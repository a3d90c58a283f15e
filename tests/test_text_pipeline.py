"""The whole text path on a real local Ray: Ray Data tokenization, a BERT teacher sharded with
ZeRO-3 across 2 gloo workers, a distilled student exported to ONNX and int8, and a Ray Serve
deployment queried over HTTP, as people and tritonclient query it, good requests and bad."""

import json
import os

import numpy as np
import pytest
import requests

from raydistill.config import load_config

from test_serving import free_port
from test_text_parts import text_rows, write_jsonl

REPO_CONFIG = "configs/text-demo.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import ray
    from ray import serve
    from transformers import BertConfig

    from raydistill import pipeline

    tmp = tmp_path_factory.mktemp("text")
    teacher = tmp / "teacher"
    BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               max_position_embeddings=64).save_pretrained(teacher)
    rows = text_rows(360)
    source = write_jsonl(tmp / "rows.jsonl", rows)
    # texts without labels for the student, some of them labelled texts again (those of val and test are dropped)
    unlabelled = write_jsonl(tmp / "unlabelled.jsonl", [{"text": r["text"] + " more"} for r in text_rows(90, seed=1)]
                             + [{"text": r["text"]} for r in rows[:30]])
    port = free_port()
    cfg = load_config(REPO_CONFIG, [
        f"data.source={source}", f"data.unlabelled_source={unlabelled}", "data.vocab_size=300", "data.max_length=24",
        f"teacher.arch=hf:{os.path.relpath(teacher)}",  # relative, as in the presets: resolved before trials start
        "sweep.num_trials=2", "sweep.trial_workers=1", "sweep.epochs=1", "sweep.max_concurrent_trials=2",
        "teacher.epochs=3", "teacher.batch_size=8", "teacher.lr=2e-3", "student.layers=1", "student.hidden=32", "student.heads=2",
        "student.epochs=3", "student.batch_size=8", "student.lr=3e-3", "student.cpus_per_worker=0.5", "deploy.min_gain_over_majority=0.0",
        f"deploy.port={port}", "deploy.model_name=words", "deploy.foreground=never", "deploy.max_request_images=8"])
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        summaries = pipeline.run_stages(cfg, str(tmp / "runs"), "t")
        yield summaries, f"http://127.0.0.1:{port}", tmp / "runs" / "t"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_sweep_searches_the_text_teacher_on_ray_train(run):
    _, _, root = run
    sweep = json.loads((root / "sweep" / "summary.json").read_text())
    assert len(sweep["trials"]) == 2 and sweep["trial_workers"] == 1
    assert all(t["epochs"] == 1 and t["metric"] is not None for t in sweep["trials"])
    assert set(sweep["best_config"]) == {"teacher.lr", "teacher.weight_decay"}


def test_the_teacher_is_sharded_and_the_student_is_smaller_and_exported(run):
    summaries, _, root = run
    teacher, student = summaries["teacher"], summaries["student"]
    assert len(teacher["params_per_rank"]) == 2 and teacher["zero_stage"] == 3
    # each rank holds its own half (ZeRO-3 pads the partitions to equal sizes)
    assert 0 <= sum(teacher["params_per_rank"]) - teacher["params_total"] < 2
    assert teacher["accuracy"] > teacher["majority_accuracy"]
    assert student["params_ratio"] > 2 and student["init"] == "fresh"
    assert student["onnx"]["max_abs_logit_diff"] <= student["onnx"]["tolerance"]
    assert student["int8_accuracy"] is not None
    for name in ("teacher/teacher.safetensors", "student/student.safetensors", "student/student.onnx",
                 "student/student.int8.onnx", "data/text/tokenizer/tokenizer.json"):
        assert (root / name).is_file(), name
    data = json.loads((root / "data" / "summary.json").read_text())
    assert data["task"] == "text_classification" and data["rows_read"] == 360
    # the student distilled on the unlabelled texts too, less those of the val and test splits
    dropped = data["unlabelled"]["skipped"]["in the val or test split"]
    assert 0 < dropped < 30 and student["unlabelled_rows"] == data["unlabelled"]["rows"] == 120 - dropped


def test_predict_takes_one_text_or_instances(run):
    _, url, _ = run
    one = requests.post(f"{url}/predict", json={"text": "sparse matrix eigenvalue solver of the given value"})
    assert one.status_code == 200, one.text
    (pred,) = one.json()["predictions"]
    assert set(pred) == {"label", "probability", "top_k"} and len(pred["top_k"]) == 3
    many = requests.post(f"{url}/predict", json={"instances": [{"text": "replica cluster node"}, {"text": "pixel crop"}]})
    assert many.status_code == 200 and len(many.json()["predictions"]) == 2


def test_tritonclient_sends_bytes_as_json_and_binary(run):
    tritonclient = pytest.importorskip("tritonclient.http")
    _, url, _ = run
    client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
    texts = np.array(["sparse linear algebra decomposition", "draw font palette colour"], dtype=object)
    meta = client.get_model_metadata("words")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    labels = []
    for binary in (False, True):
        tensor = tritonclient.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(texts, binary_data=binary)
        result = client.infer("words", [tensor], outputs=[tritonclient.InferRequestedOutput("probabilities", binary)])
        probs = result.as_numpy("probabilities")
        assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
        labels.append(probs.argmax(1).tolist())
    assert labels[0] == labels[1]


@pytest.mark.parametrize("body, status, says", [
    (b'{"text": "\xff\xfe"}', 400, "not UTF-8"),
    (json.dumps({"text": 12}).encode(), 400, "expected a string, got int"),
    (json.dumps({"text": "   "}).encode(), 400, "is empty"),
    (json.dumps({"text": "x" * 20000}).encode(), 413, "max_text_bytes"),
    (json.dumps({"text": "word " * 800}).encode(), 400, "max_text_tokens"),
    (json.dumps({"instances": [{"text": "a"}] * 9}).encode(), 413, "max_request_images"),
    (json.dumps({"instances": [{"txt": "a"}]}).encode(), 400, "unknown field"),
    (json.dumps({"text": "a", "text_pair": "b"}).encode(), 400, "reads single texts"),
    (json.dumps([1, 2]).encode(), 400, "JSON object"),
])
def test_bad_predict_requests_get_a_4xx_that_names_the_problem(run, body, status, says):
    _, url, _ = run
    reply = requests.post(f"{url}/predict", data=body, headers={"content-type": "application/json"})
    assert reply.status_code == status and says in reply.json()["error"], reply.text


@pytest.mark.parametrize("tensor, says", [
    ({"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}, "must be BYTES"),
    ({"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", 2]}, "must hold strings"),
    ({"name": "words", "shape": [1], "datatype": "BYTES", "data": ["a"]}, "expected input(s) named ['text']"),
    ({"name": "text", "shape": [0], "datatype": "BYTES", "data": []}, "no text given"),
])
def test_bad_infer_requests_get_a_4xx_that_names_the_problem(run, tensor, says):
    _, url, _ = run
    reply = requests.post(f"{url}/v2/models/words/infer", json={"inputs": [tensor]})
    assert reply.status_code == 400 and says in reply.json()["error"], reply.text


def test_query_cli_prints_texts_with_class_names(run, capsys):
    from raydistill.client import query

    _, url, _ = run
    assert query(url, [], texts=["sparse matrix eigenvalue", "pixel crop font " * 10]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["text", "label", "prob"] and len(out) == 3
    assert out[2].startswith("pixel crop font") and "..." in out[2]  # long texts are shortened
