"""Extractive question answering on a real local Ray: SQuAD JSON read and checked by Ray Data,
contexts cut into doc_stride windows whose answers map back to characters, a BERT teacher
sharded with ZeRO-3 across 2 gloo workers, a student distilled on start/end logits, ONNX and
int8, exact match and F1 as the SQuAD script computes them, and a Ray Serve deployment
answering {"question", "context"} over HTTP, as people and tritonclient send them."""

import json

import numpy as np
import pytest
import requests

from raydistill.config import ConfigError, load_config
from raydistill.data import DataError
from raydistill.text import qa

from test_serving import free_port

FACTS = {"colour": ["red", "green", "blue", "amber", "violet"], "size": ["tiny", "small", "large", "huge", "vast"],
         "home": ["paris", "lima", "oslo", "cairo", "quito"]}
THINGS = ["box", "kite", "lamp", "drum", "boat", "coin", "vase", "bell"]


def squad_examples(n: int, seed: int = 0) -> list[dict]:
    """Paragraphs of one fact about a thing among filler sentences, and a question on the fact
    (generated: tests only). Contexts run past one 48-token window, and the answer sits in any
    of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        thing = THINGS[i % len(THINGS)]
        key = list(FACTS)[rng.integers(len(FACTS))]
        filler = [f"It was seen in year {rng.integers(1000, 9999)} by {rng.choice(THINGS)}."
                  for _ in range(rng.integers(2, 6))]
        sentences = [f"The {thing} has {key} {rng.choice(FACTS[key])}.", *filler]
        rng.shuffle(sentences)
        context = " ".join(sentences) + f" Item {i}."
        value = context.split(f"has {key} ", 1)[1].split(".", 1)[0]
        start = context.index(f"has {key} {value}") + len(f"has {key} ")
        out.append({"id": f"q{i}", "question": f"What {key} does the {thing} have?", "context": context,
                    "answers": [{"text": value, "answer_start": start}]})
    return out


def write_squad(path, examples) -> str:
    """SQuAD v1.1 JSON: one paragraph per example."""
    data = [{"title": "t", "paragraphs": [{"context": e["context"], "qas": [
        {"id": e["id"], "question": e["question"], "answers": e["answers"]}]} for e in examples]}]
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return str(path)


def qa_cfg(source: str, *sets: str):
    return load_config(None, ["task=question_answering", "teacher.arch=hf:/nonexistent", f"data.source={source}",
                              "data.vocab_size=200", "data.max_length=48", "data.doc_stride=16", *sets])


# ---- parts without Ray --------------------------------------------------------------------

@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("The Cat!", "cat", 1.0, 1.0),               # case, punctuation and articles do not count
    ("the big red dog", "red dog", 0.0, 0.8),    # precision 2/3, recall 1
    ("red red dog", "red dog red", 0.0, 1.0),    # tokens counted as a multiset
    ("blue", "red dog", 0.0, 0.0),
    ("", "", 1.0, 1.0),                          # an unanswerable question, left unanswered
    ("paris", "", 0.0, 0.0),                     # an unanswerable question, answered
])
def test_exact_match_and_f1_are_the_squad_scripts(prediction, gold, em, f1):
    assert qa.exact_match(prediction, gold) == em
    assert qa.f1_score(prediction, gold) == pytest.approx(f1)


def test_squad_scores_take_the_best_gold_answer_and_count_unpredicted_examples_as_wrong():
    scores = qa.squad_scores({"a": "red dog", "b": "x"}, {"a": ["dog", "red dog"], "b": ["y"], "c": ["z"]})
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["f1"] == pytest.approx(1 / 3)


def test_the_best_span_is_decoded_to_characters_and_no_answer_wins_only_where_allowed():
    context = "The box has colour red."
    #            token:  [CLS] q   The  box  has  colour red  .
    offset_start = np.array([[-1, -1, 0, 4, 8, 12, 19, 22]])
    offset_end = np.array([[-1, -1, 3, 7, 11, 18, 22, 23]])
    logits = np.full((1, 8, 2), -5.0)
    logits[0, 6] = [4.0, 4.0]      # "red" as start and end
    logits[0, 1] = [9.0, 9.0]      # the question token: never an answer
    spans = qa.window_spans(logits, offset_start, offset_end, max_answer_tokens=3)
    (answer,) = qa.best_answers(list(zip(["e"], spans)), {"e": context}, allow_no_answer=False).values()
    assert answer[:3] == ("red", 19, 22) and 0 < answer[3] <= 1
    logits[0, 0] = [6.0, 6.0]      # [CLS] above the span: "no answer" for a SQuAD v2.0 model only
    spans = qa.window_spans(logits, offset_start, offset_end, max_answer_tokens=3)
    assert qa.best_answers(list(zip(["e"], spans)), {"e": context}, allow_no_answer=True)["e"][0] == ""
    assert qa.best_answers(list(zip(["e"], spans)), {"e": context}, allow_no_answer=False)["e"][0] == "red"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = [e["question"] + " " + e["context"] for e in squad_examples(200)]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(folder))
    return str(folder)


def test_windows_overlap_and_map_every_answer_back_to_its_characters(tokenizer_dir):
    examples = squad_examples(40)
    batch = {"id": np.array([e["id"] for e in examples], dtype=object),
             "question": np.array([e["question"] for e in examples], dtype=object),
             "context": np.array([e["context"] for e in examples], dtype=object),
             "answers": np.array([json.dumps([[a["text"], a["answer_start"]] for a in e["answers"]])
                                  for e in examples], dtype=object)}
    out = qa.tokenize_windows(batch, folder=tokenizer_dir, max_length=32, doc_stride=8)
    by_id = {e["id"]: e for e in examples}
    found = set()
    windows = {e: int((out["example"] == e).sum()) for e in by_id}
    assert max(windows.values()) >= 3 and out["input_ids"].shape[1] == 32
    for w, example in enumerate(out["example"]):
        s, e = out["start_positions"][w], out["end_positions"][w]
        if s == 0:
            assert e == 0  # a window without the whole answer points at [CLS]
            continue
        context = by_id[example]["context"]
        assert context[out["offset_start"][w][s]:out["offset_end"][w][e]] == by_id[example]["answers"][0]["text"]
        found.add(example)
    assert found == set(by_id)  # every answer sits whole in some window


def test_a_question_past_half_the_window_is_cut_after_its_last_fitting_token(tokenizer_dir):
    from raydistill.text.data import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    long, short = "what colour does the box have " * 5, "what colour does the box have?"
    cut, same = qa.cut_questions(tok, [long, short], max_length=32)
    assert same == short and long.startswith(cut) and qa.question_lengths(tok, [cut]) == [qa.question_budget(32)]


def test_squad_scores_treat_a_gold_answer_of_only_articles_as_no_answer():
    assert qa.squad_scores({"a": ""}, {"a": ["the"]})["exact_match"] == 1.0


def test_the_bundled_question_set_asks_both_kinds_and_its_answers_sit_where_they_say():
    from raydistill.text.corpus import parameter_questions

    rows = parameter_questions(limit=200)
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    kinds = {r["id"].rsplit("-", 1)[1] for r in rows}
    assert kinds == {"name", "type"}
    for r in rows:
        (answer,) = r["answers"]
        start = answer["answer_start"]
        assert r["context"][start : start + len(answer["text"])] == answer["text"], r


def test_qa_config_refuses_a_text_pair_and_an_unknown_task():
    with pytest.raises(ConfigError, match="question answering pairs data.question_column"):
        load_config(None, ["task=question_answering", "teacher.arch=hf:x", "data.text_pair_column=b"])
    with pytest.raises(ConfigError, match="question_answering"):
        load_config(None, ["task=summarization"])
    with pytest.raises(ConfigError, match="token_delete would move the answer span's tokens"):
        load_config(None, ["task=question_answering", "teacher.arch=hf:x", "data.augment=[{op: token_delete}]"])
    with pytest.raises(ConfigError, match="data.doc_stride 40 must be under half"):
        load_config(None, ["task=question_answering", "teacher.arch=hf:x", "data.max_length=64", "data.doc_stride=40"])


def test_bytes_outputs_read_back_through_tritonclient():
    tritonclient_utils = pytest.importorskip("tritonclient.utils")
    from raydistill.inference_protocol import encode_response

    answers = np.array(["red", "", "caf\u00e9 \u2603"], dtype=object)
    body, headers = encode_response({}, [("answer", answers, True), ("start", np.array([1, 2, 3]), False)])
    head_len = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:head_len])
    assert head["outputs"][0]["datatype"] == "BYTES" and head["outputs"][1]["data"] == [1, 2, 3]
    decoded = tritonclient_utils.deserialize_bytes_tensor(body[head_len:])
    assert [b.decode() for b in decoded] == answers.tolist()
    as_json, _ = encode_response({}, [("answer", answers, False)])
    assert json.loads(as_json)["outputs"][0]["data"] == answers.tolist()


# ---- the whole path on a local Ray -------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import ray
    from ray import serve
    from transformers import BertConfig

    from raydistill import pipeline

    tmp = tmp_path_factory.mktemp("qa")
    teacher = tmp / "teacher"
    BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               max_position_embeddings=64).save_pretrained(teacher)
    source = write_squad(tmp / "train.json", squad_examples(360))
    port = free_port()
    cfg = load_config("configs/qa-demo.yaml", [
        f"data.source={source}", "data.vocab_size=300", "data.max_length=48", "data.doc_stride=16",
        "data.max_answer_tokens=4", f"teacher.arch=hf:{teacher}",
        "teacher.epochs=6", "teacher.batch_size=16", "teacher.lr=3e-3", "student.layers=1", "student.hidden=32",
        "student.heads=2", "student.epochs=6", "student.batch_size=16", "student.lr=3e-3", "student.cpus_per_worker=0.5",
        "deploy.min_gain_over_majority=0.0", f"deploy.port={port}", "deploy.model_name=facts",
        "deploy.foreground=never", "deploy.max_request_images=8"])
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summaries = pipeline.run_stages(cfg, str(tmp / "runs"), "q")
        yield summaries, f"http://127.0.0.1:{port}", tmp
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_teacher_and_student_answer_and_are_scored_as_squad_scores(run):
    summaries, _, tmp = run
    teacher, student = summaries["teacher"], summaries["student"]
    data = json.loads((tmp / "runs" / "q" / "data" / "summary.json").read_text())
    assert data["task"] == "question_answering" and data["rows_read"] == 360
    assert sum(data["windows"].values()) > sum(data["examples"].values())  # contexts span several windows
    assert len(teacher["params_per_rank"]) == 2 and teacher["zero_stage"] == 3
    # broken windows, offsets or decoding would score near 0
    assert teacher["test_f1"] > 0.6, teacher
    assert student["f1"] == student["accuracy"] and 0 <= student["exact_match"] <= student["f1"]
    assert student["onnx"]["max_abs_logit_diff"] <= student["onnx"]["tolerance"]
    assert student["int8_f1"] is not None and student["params_ratio"] > 2
    for name in ("student/student.onnx", "student/student.int8.onnx", "data/text/test_examples"):
        assert (tmp / "runs" / "q" / name).exists(), name


def test_predict_answers_with_the_span_in_the_context(run):
    _, url, _ = run
    context = "It was seen in year 1999 by boat. The kite has home oslo. It was seen in year 1234 by drum."
    one = requests.post(f"{url}/predict", json={"question": "What home does the kite have?", "context": context})
    assert one.status_code == 200, one.text
    body = one.json()
    assert set(body) >= {"answer", "start", "end", "score", "predictions"}
    assert context[body["start"]:body["end"]] == body["answer"] and 0 <= body["score"] <= 1
    many = requests.post(f"{url}/predict", json={"instances": [{"question": "What home does the kite have?",
                                                                "context": context}] * 2})
    assert many.status_code == 200 and len(many.json()["predictions"]) == 2


def test_tritonclient_sends_question_and_context_and_reads_the_answer(run):
    tritonclient = pytest.importorskip("tritonclient.http")
    _, url, _ = run
    client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
    meta = client.get_model_metadata("facts")
    assert [i["name"] for i in meta["inputs"]] == ["question", "context"]
    context = "The drum has colour red. It was seen in year 1500 by lamp."
    answers = []
    for binary in (False, True):
        inputs = []
        for name, value in (("question", "What colour does the drum have?"), ("context", context)):
            tensor = tritonclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value], dtype=object), binary_data=binary)
            inputs.append(tensor)
        outputs = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in ("answer", "start", "end")]
        result = client.infer("facts", inputs, outputs=outputs)
        answer = result.as_numpy("answer")[0]
        answer = answer.decode() if isinstance(answer, bytes) else answer
        assert context[int(result.as_numpy("start")[0]):int(result.as_numpy("end")[0])] == answer
        answers.append(answer)
    assert answers[0] == answers[1]


def test_query_cli_prints_the_answer(run, capsys):
    from raydistill.cli import main

    _, url, _ = run
    context = "The boat has size huge. It was seen in year 1200 by coin."
    assert main(["query", "--url", url, "--question", "What size does the boat have?", "--context", context]) == 0
    lines = capsys.readouterr().out.splitlines()
    answer = lines[0].removeprefix("answer: ")
    start, end = map(int, lines[1].split()[2].split(".."))
    assert lines[0].startswith("answer: ") and context[start:end] == answer


@pytest.mark.parametrize("body, status, says", [
    ({"question": "What colour?"}, 400, "reads 'question' and 'context'"),
    ({"question": 7, "context": "The box has colour red."}, 400, "expected a string, got int"),
    ({"question": "What colour?", "context": "  "}, 400, "context 0 is empty"),
    ({"question": "What colour?", "context": "word " * 900}, 400, "max_text_tokens"),
    ({"text": "What colour?"}, 400, "needs {\"question\""),
    ({"question": "colour " * 30, "context": "The box has colour red."}, 400, "reads questions of at most 22"),
])
def test_bad_questions_get_a_4xx_that_names_the_problem(run, body, status, says):
    _, url, _ = run
    reply = requests.post(f"{url}/predict", json=body)
    assert reply.status_code == status and says in reply.json()["error"], reply.text


def test_answers_not_in_their_context_are_named_and_skipped_rows_counted(run, tmp_path):
    from raydistill.text import qa_data

    examples = squad_examples(60, seed=3)
    examples[0]["answers"] = [{"text": "purple", "answer_start": 5}]                       # not in the context
    examples[1]["answers"][0]["answer_start"] += 2                                         # points elsewhere
    examples[2]["answers"][0]["answer_start"] = str(examples[2]["answers"][0]["answer_start"])  # a string
    examples[3]["answers"][0]["answer_start"] = -1
    source = write_squad(tmp_path / "bad.json", examples)
    with pytest.raises(DataError, match="4 bad rows of 60.*answer not found in its context"):
        qa_data.prepare(qa_cfg(source), source, tmp_path / "out")
    data = qa_data.prepare(qa_cfg(source, "data.on_bad_rows=skip"), source, tmp_path / "out")
    assert data.rows_skipped == {"answer not found in its context": 1,
                                 "answer_start does not match the answer text": 1,
                                 "an answer_start is not an integer": 1, "an answer_start is negative": 1}
    assert sum(data.examples(s) for s in ("train", "val", "test")) == 56


def test_a_parquet_source_without_the_context_column_is_named(run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.text import qa_data

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"question": ["q"], "passage": ["c"], "answers": [{"text": ["c"], "answer_start": [0]}]}), path)
    with pytest.raises(DataError, match="no column 'context' \\(the file has question, passage, answers\\)"):
        qa_data.prepare(qa_cfg(str(path)), str(path), tmp_path / "out")
