"""The text task's parts, each against the real library it builds on: rows checked and
tokenized by Ray Data, tokenizers and BERT models from local folders, token augmentation,
DistilBERT initialisation, ONNX export and int8, and the OIP BYTES codec."""

import json
import struct

import numpy as np
import pytest
import torch

from raydistill.config import ConfigError, load_config
from raydistill.data import DataError
from raydistill.inference_protocol import ProtocolError, decode_request

WORDS = {0: "matrix eigenvalue solver sparse linear algebra decomposition",
         1: "request server replica deployment autoscaling cluster node",
         2: "pixel colour palette resize crop draw font"}


def text_rows(n: int, seed: int = 0) -> list[dict]:
    """Three classes of texts drawn from their own words plus shared ones (generated: tests only)."""
    rng = np.random.default_rng(seed)
    shared = "the a of returns given value object default".split()
    rows = []
    for i in range(n):
        label = i % 3
        own = WORDS[label].split()
        words = list(rng.choice(own, 5)) + list(rng.choice(shared, 4))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_cfg(source: str, *sets: str):
    return load_config(None, ["task=text_classification", "teacher.arch=hf:/nonexistent", f"data.source={source}",
                              "data.vocab_size=200", "data.max_length=16", *sets])


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


# ---- config ---------------------------------------------------------------------------------

def test_text_config_refuses_image_ops_and_a_timm_teacher():
    with pytest.raises(ConfigError, match="flip cannot augment a text_classification run"):
        load_config(None, ["task=text_classification", "teacher.arch=hf:x", "data.augment=[{op: flip}]"])
    with pytest.raises(ConfigError, match="a text task's teacher is a Hugging Face model"):
        load_config(None, ["task=text_classification", "teacher.arch=resnet18"])
    with pytest.raises(ConfigError, match="token_mask cannot augment a image_classification run"):
        load_config(None, ["data.augment=[{op: token_mask}]"])
    with pytest.raises(ConfigError, match="a text student runs its teacher online"):
        text_cfg("x", "student.teacher_mode=offline")
    assert text_cfg("x").data.augment == []  # unset: texts as they are, never the image defaults


# ---- data -----------------------------------------------------------------------------------

def test_rows_are_checked_split_and_tokenized(local_ray, tmp_path):
    from raydistill.text.data import TextData, load_tokenizer, prepare

    rows = text_rows(90) + [{"text": "", "label": 0}, {"text": "fine words", "label": 7},
                            {"text": 42, "label": 1}, {"text": "label is words", "label": "two"}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"4 bad rows of 94 .*(empty text|out of range|not a string|not an integer)"):
        prepare(text_cfg(source, "data.num_classes=3"), source, tmp_path / "fail")
    assert not (tmp_path / "fail").exists()  # nothing half-written

    data = prepare(text_cfg(source, "data.num_classes=3", "data.on_bad_rows=skip"), source, tmp_path / "ok")
    assert data.rows_read == 94
    assert data.rows_skipped == {"empty text": 1, "label out of range 0..2": 1, "text is not a string": 1,
                                 "label is not an integer": 1}
    assert sum(data.rows(s) for s in ("train", "val", "test")) == 90
    again = TextData.load(tmp_path / "ok")
    assert again.class_counts == data.class_counts
    arrays = data.arrays("val")
    assert arrays["input_ids"].shape == (data.rows("val"), 16)
    tok = load_tokenizer(data.tokenizer_dir)
    first = tok.decode(arrays["input_ids"][0], skip_special_tokens=True)
    assert first.split()[0] in " ".join(WORDS.values()) + " the a of returns given value object default"
    # the same text lands in the same split on every run and every worker (a seeded hash of it)
    from raydistill.text.data import check_rows

    batch = {"text": np.array(["fine words"] * 2, dtype=object), "label": np.array([1, 1])}
    kwargs = {"text": "text", "pair": None, "label": "label", "num_classes": 3, "seed": 0,
              "val_fraction": 0.1, "test_fraction": 0.2}
    assert len(set(check_rows(batch, **kwargs)["split"])) == 1


def test_a_missing_column_and_a_string_label_column_are_named(local_ray, tmp_path):
    from raydistill.text.data import prepare

    csv = tmp_path / "rows.csv"
    csv.write_text("body,label\nsome words here,0\nmore words,1\n")
    with pytest.raises(DataError, match=r"no column 'text' \(the file has body, label\)"):
        prepare(text_cfg(str(csv)), str(csv), tmp_path / "a")
    csv.write_text("text,label\nsome words here,zero\nmore words,one\n")
    with pytest.raises(DataError, match="must hold integer class ids"):
        prepare(text_cfg(str(csv)), str(csv), tmp_path / "b")


def test_unlabelled_texts_are_checked_and_stored_without_the_val_and_test_texts(local_ray, tmp_path):
    from raydistill.text.data import HELD_OUT, UNLABELLED, TextData, prepare

    labelled = text_rows(90)
    source = write_jsonl(tmp_path / "rows.jsonl", labelled)
    fresh = [{"text": r["text"] + " unlabelled"} for r in text_rows(60, seed=1)]
    # the labelled texts again, unlabelled: those of the val and test splits must not reach the student
    unlabelled = write_jsonl(tmp_path / "more.jsonl", fresh + [{"text": r["text"]} for r in labelled] + [{"text": ""}])
    cfg = text_cfg(source, "data.num_classes=3", f"data.unlabelled_source={unlabelled}")
    with pytest.raises(DataError, match=r"data.unlabelled_source .*more.jsonl: 1 bad rows of 151 \(empty text\)"):
        prepare(cfg, source, tmp_path / "fail")

    cfg = text_cfg(source, "data.num_classes=3", f"data.unlabelled_source={unlabelled}", "data.on_bad_rows=skip")
    data = prepare(cfg, source, tmp_path / "ok")
    held_out = data.rows("val") + data.rows("test")
    assert held_out > 0
    assert data.unlabelled == {"source": unlabelled, "rows": 60 + data.rows("train"),
                               "skipped": {HELD_OUT: held_out, "empty text": 1}}
    assert data.rows(UNLABELLED) == 60 + data.rows("train")
    stored = data.arrays(UNLABELLED)
    assert (stored["label"] == -1).all() and stored["input_ids"].shape == (data.rows(UNLABELLED), 16)
    test_ids = {tuple(r) for r in data.arrays("test")["input_ids"]}
    assert not test_ids & {tuple(r) for r in stored["input_ids"]}
    assert TextData.load(tmp_path / "ok").unlabelled == data.unlabelled


def test_the_student_reads_unlabelled_texts_only_with_kd_and_the_control_gets_as_many_steps():
    from raydistill.text.data import UNLABELLED, TextData
    from raydistill.text.distill import labels_only
    from raydistill.text.train import plan_of, training_splits

    data = TextData(root="x", source="x", num_classes=3, max_length=16, rows_read=140,
                    class_counts={"train": {"0": 50, "1": 50}}, unlabelled={"source": "u", "rows": 300, "skipped": {}})
    cfg = text_cfg("x", "student.epochs=3", "student.batch_size=10", "student.alpha=0.5")
    assert training_splits(cfg, data, "student") == (UNLABELLED, "train")
    assert training_splits(cfg, data, "teacher") == ("train",)
    assert plan_of(cfg, data, "student").total_steps == 3 * 40
    control = labels_only(cfg, data)
    assert (control.student.alpha, control.student.hidden_weight, control.student.attention_weight) == (1.0, 0, 0)
    assert training_splits(control, data, "student") == ("train",)
    assert plan_of(control, data, "student").total_steps == 3 * 40 == control.student.epochs * 10
    # without unlabelled texts the control is the student's own recipe at alpha=1
    plain = TextData(root="x", source="x", num_classes=3, max_length=16, rows_read=100,
                     class_counts={"train": {"0": 50, "1": 50}})
    assert labels_only(cfg, plain).student.epochs == 3


def test_each_epoch_reads_the_splits_in_turn_in_batches_of_their_own(local_ray):
    import ray

    from raydistill.text.train import batches
    from raydistill.training import StepPlan

    def split(label: int, n: int):
        return ray.data.from_items([{"input_ids": [5, 6, 0], "attention_mask": [1, 1, 0], "token_type_ids": [0, 0, 0],
                                     "label": label} for _ in range(n)])

    unlabelled, labelled = split(-1, 40), split(1, 20)
    out = list(batches([unlabelled, labelled], [4, 2], 8, StepPlan(epochs=2, steps_per_epoch=6), "cpu", seed=0))
    assert [micro for micro, _ in out] == list(range(1, 13))
    kinds = [set(b["label"].tolist()) for _, b in out]
    assert kinds == [{-1}] * 4 + [{1}] * 2 + [{-1}] * 4 + [{1}] * 2
    assert out[0][1]["input_ids"].shape == (8, 2)  # trimmed to the longest row


def test_a_missing_unlabelled_source_or_column_is_named(local_ray, tmp_path):
    from raydistill.text.data import prepare

    source = write_jsonl(tmp_path / "rows.jsonl", text_rows(30))
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=r"data.unlabelled_source .*nowhere.jsonl: not found"):
        prepare(text_cfg(source, f"data.unlabelled_source={missing}"), source, tmp_path / "a")
    wrong = write_jsonl(tmp_path / "body.jsonl", [{"body": "some words"}])
    with pytest.raises(DataError, match=r"data.unlabelled_source .*body.jsonl: no column 'text' \(the file has body\)"):
        prepare(text_cfg(source, f"data.unlabelled_source={wrong}"), source, tmp_path / "b")
    with pytest.raises(ConfigError, match="unlabelled texts serve text_classification students, not question_answering"):
        load_config(None, ["task=question_answering", "teacher.arch=hf:x", f"data.unlabelled_source={wrong}"])
    with pytest.raises(ConfigError, match="not image_classification"):
        load_config(None, [f"data.unlabelled_source={wrong}"])


def test_placement_groups_a_fit_leaves_are_removed_and_older_ones_kept(local_ray):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from raydistill.training import releasing_placement_groups

    older = placement_group([{"CPU": 0.1}])
    ray.get(older.ready())
    with releasing_placement_groups():  # as a Train run whose cleaner gave up leaves its worker group's
        left = placement_group([{"CPU": 0.5}])
        ray.get(left.ready())
    table = placement_group_table()
    assert table[left.id.hex()]["state"] == "REMOVED"
    assert table[older.id.hex()]["state"] == "CREATED"
    remove_placement_group(older)


# ---- models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BERT with weights saved to a local folder, as a user's fine-tuned teacher would be."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_a_local_teacher_folder_loads_with_its_weights_and_mismatches_are_named(bert_folder, tmp_path):
    from transformers import BertModel

    from raydistill.text.models import ModelError, build_teacher

    teacher = build_teacher(f"hf:{bert_folder}", 3, 120, pretrained=True, seed=0)
    saved = BertModel.from_pretrained(bert_folder)
    assert torch.equal(teacher.bert.encoder.layer[2].output.dense.weight, saved.encoder.layer[2].output.dense.weight)
    assert teacher.config.num_labels == 3
    with pytest.raises(ModelError, match="embeddings hold 120 tokens but the tokenizer has 500"):
        build_teacher(f"hf:{bert_folder}", 3, 500, pretrained=True, seed=0)
    with pytest.raises(ModelError, match="no folder .*missing, and no such model in the local Hugging Face cache"):
        build_teacher(f"hf:{tmp_path / 'missing'}", 3, 120, pretrained=False, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((bert_folder / "config.json").read_text())
    with pytest.raises(ModelError, match="no loadable weights"):
        build_teacher(f"hf:{tmp_path / 'empty'}", 3, 120, pretrained=True, seed=0)


def test_the_teacher_gives_the_same_soft_labels_while_the_student_trains(bert_folder):
    from types import SimpleNamespace

    from raydistill.text.models import build_teacher
    from raydistill.text.train import Classification, StudentFactory, TextDistillation

    teacher = build_teacher(f"hf:{bert_folder}", 3, 120, pretrained=True, seed=0)
    student = StudentFactory(1, 32, 2, "fresh")(teacher)
    scfg = SimpleNamespace(temperature=2.0, alpha=0.5, hidden_weight=0.0, attention_weight=0.0)
    trainee = TextDistillation(student, teacher, scfg, Classification(None)).train()
    assert trainee.student.training and not trainee.teacher.training  # no dropout in the soft labels
    ids = torch.randint(5, 120, (4, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    assert torch.equal(teacher(**inputs).logits, teacher(**inputs).logits)


def test_student_layers_come_from_every_kth_teacher_layer(bert_folder):
    from raydistill.text.models import build_teacher
    from raydistill.text.train import StudentFactory

    teacher = build_teacher(f"hf:{bert_folder}", 3, 120, pretrained=True, seed=0)
    student = StudentFactory(layers=2, hidden=32, heads=2, init="auto")(teacher)
    assert student.config.num_hidden_layers == 2
    for i, j in enumerate([1, 3]):
        assert torch.equal(student.bert.encoder.layer[i].attention.self.query.weight,
                           teacher.bert.encoder.layer[j].attention.self.query.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    narrow = StudentFactory(layers=2, hidden=16, heads=2, init="auto")
    assert narrow.plan(teacher.config) == "fresh"
    with pytest.raises(ValueError, match="needs the teacher's hidden size"):
        StudentFactory(layers=2, hidden=16, heads=2, init="teacher_layers").plan(teacher.config)


def test_token_ops_leave_special_tokens_and_padding_alone():
    from raydistill.text.train import augment_tokens

    cls, sep, pad, mask = 2, 3, 0, 4
    ids = torch.tensor([[cls, 10, 11, 12, 13, 14, sep, pad, pad]] * 64)
    attention = (ids != pad).long()
    batch = {"input_ids": ids, "attention_mask": attention, "token_type_ids": torch.zeros_like(ids)}
    special = torch.tensor([pad, 1, cls, sep, mask])
    for op in ("token_mask", "token_delete", "token_swap"):
        out = augment_tokens(batch, [{"op": op, "rate": 0.5, "p": 1.0}], special, mask, pad,
                             torch.Generator().manual_seed(0))
        got = out["input_ids"]
        assert (got[:, 0] == cls).all(), op
        assert not torch.equal(got, ids), op  # the op did something
        for row, keep in zip(got, out["attention_mask"]):
            kept = row[keep.bool()]
            assert kept[-1] == sep and (row[~keep.bool()] == pad).all(), op
            if op == "token_swap":
                assert sorted(kept.tolist()) == sorted(ids[0][attention[0].bool()].tolist())
            if op == "token_mask":
                assert set(kept[1:-1].tolist()) <= {10, 11, 12, 13, 14, mask}
            if op == "token_delete":
                assert len(kept) < 7 or torch.equal(kept, ids[0][:7])
        again = augment_tokens(batch, [{"op": op, "rate": 0.5, "p": 1.0}], special, mask, pad,
                               torch.Generator().manual_seed(0))
        assert torch.equal(again["input_ids"], got), op  # seeded: a resumed run sees the same views


def test_onnx_export_and_int8_match_torch_on_dynamic_batch_and_length(bert_folder, tmp_path):
    from raydistill.compress import onnx_session
    from raydistill.text import export
    from raydistill.text.models import build_teacher

    model = build_teacher(f"hf:{bert_folder}", 3, 120, pretrained=True, seed=0).eval()
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 40)
    ids = rng.integers(5, 120, (40, 32))
    mask = (np.arange(32)[None] < lengths[:, None]).astype(np.int64)
    arrays = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
              "label": np.zeros(40, dtype=np.int64)}
    path = export.export_onnx(model, tmp_path / "m.onnx", 32)
    expected = export.torch_logits(model, arrays, batch=7)
    checked = export.check_export(expected, export.onnx_logits(onnx_session(path), arrays, batch=7), 1e-3, "fp32")
    assert checked["top1_agreement"] == 1.0
    int8 = export.quantize_int8(path, tmp_path / "m.int8.onnx")
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # the linear layers run in int8
    got = export.onnx_logits(onnx_session(int8), arrays, batch=40)
    assert np.abs(got - expected).max() < 0.5
    with pytest.raises(RuntimeError, match="differs from torch"):
        export.check_export(expected, expected + 1.0, 1e-3, "a shifted export")


# ---- the OIP BYTES codec, as tritonclient encodes it ------------------------------------------

def test_bytes_inputs_decode_from_json_and_binary_as_tritonclient_sends_them():
    tritonclient = pytest.importorskip("tritonclient.http")
    texts = np.array([["héllo wörld"], ["second text"]], dtype=object)
    for binary in (False, True):
        tensor = tritonclient.InferInput("text", list(texts.shape), "BYTES")
        tensor.set_data_from_numpy(texts, binary_data=binary)
        body, header_length = tritonclient.InferenceServerClient.generate_request_body([tensor])
        payload, arrays = decode_request(body, None if header_length is None else str(header_length))
        assert arrays["text"].reshape(-1).tolist() == ["héllo wörld", "second text"], binary


def test_bad_bytes_inputs_are_named():
    def body(tensor: dict, blob: bytes = b""):
        head = json.dumps({"inputs": [tensor]}).encode()
        return head + blob, (str(len(head)) if blob else None)

    with pytest.raises(ProtocolError, match="must hold strings, got int"):
        decode_request(*body({"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", 3]}))
    raw = struct.pack("<I", 2) + b"\xff\xfe"
    with pytest.raises(ProtocolError, match="not UTF-8"):
        decode_request(*body({"name": "text", "shape": [1], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(raw)}}, raw))
    short = struct.pack("<I", 50) + b"abc"
    with pytest.raises(ProtocolError, match="runs past its data"):
        decode_request(*body({"name": "text", "shape": [1], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(short)}}, short))
    with pytest.raises(ProtocolError, match="holds 2 values; shape \\[3\\] needs 3"):
        decode_request(*body({"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}))


@pytest.mark.parametrize("sets, exit_code, message", [
    (["teacher.arch=hf:no/such-model-in-the-cache"], 1, "no such model in the local Hugging Face cache"),
    (["data.augment=[{op: flip}]"], 2, "flip cannot augment a text_classification run"),
])
def test_a_text_run_refuses_a_missing_teacher_before_ray_starts(tmp_path, sets, exit_code, message):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "raydistill"), "run", "--config", str(repo / "configs" / "text-demo.yaml"),
           "--storage", str(tmp_path)]
    for item in sets:
        cmd += ["--set", item]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == exit_code, out.stderr
    assert message in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr
