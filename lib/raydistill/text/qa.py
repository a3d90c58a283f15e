"""Extractive question answering: SQuAD-format rows read and checked, contexts cut into
overlapping windows whose tokens keep their character offsets, answer spans decoded from
start/end logits back to characters, and exact match / F1 computed as the official SQuAD
v2.0 evaluation script does (which for answerable questions is the v1.1 script).

A row is (id, question, context, answers), each answer a text and the character where it
starts in the context; no answers marks an unanswerable question (SQuAD v2.0). A row whose
answer is not in its context, or whose answer_start does not point at its text, is bad. The
splits are drawn from a hash of the context, so the questions of one paragraph share a split.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import numpy as np

from raydistill.data import DataError, split_of

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
TARGETS = ("start_positions", "end_positions")
# What evaluation reads of a window beside its tokens: where each token sits in the context
# (-1 outside it) and the example the window belongs to.
SPAN_COLUMNS = ("offset_start", "offset_end", "example")
EXAMPLE_COLUMNS = ("id", "context", "answers")
N_BEST = 20


# ---- reading -----------------------------------------------------------------------------

def squad_file_rows(item: dict) -> list[dict]:
    """The rows of one SQuAD v1.1/v2.0 JSON file (a Ray Data flat_map function)."""
    path = item["file"]
    try:
        doc = json.loads(Path(path).read_bytes() if "://" not in path else _read_uri(path))
    except (OSError, ValueError) as err:
        raise DataError(f"data.source {path}: not SQuAD JSON ({str(err)[:160]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"data.source {path}: SQuAD JSON holds {{\"data\": [{{\"paragraphs\": [...]}}]}}; "
                        "for one row per line use a .jsonl file")
    rows = []
    for article in doc["data"]:
        for para in (article.get("paragraphs") or []) if isinstance(article, dict) else []:
            context = para.get("context") if isinstance(para, dict) else None
            for qa in (para.get("qas") or []) if isinstance(para, dict) else []:
                if not isinstance(qa, dict):
                    continue
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append({"id": str(qa.get("id", "")), "question": qa.get("question"), "context": context,
                             "answers": json.dumps(answers)})
    return rows


def _read_uri(uri: str) -> bytes:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_rows(source: str, kind: str, files: list[str]):
    """Ray Data rows (id, question, context, answers as JSON text): SQuAD JSON is flattened per
    file in tasks; Parquet and JSONL rows are read as they are."""
    import ray.data

    from raydistill.text.data import read_source

    if kind == "squad":
        return ray.data.from_items([{"file": f} for f in files]).flat_map(squad_file_rows)
    return read_source(source)


def _answers_of(value) -> list[tuple] | None:
    """[(text, answer_start)] from SQuAD's list of {text, answer_start}, the Hugging Face
    datasets form {text: [...], answer_start: [...]}, or JSON text of either; None if malformed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if texts is None or starts is None or len(texts) != len(starts):
            return None
        return list(zip(list(texts), list(starts)))
    if isinstance(value, (list, np.ndarray)):
        if not all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
            return None
        return [(a["text"], a["answer_start"]) for a in value]
    return None


def _answer_problem(context: str, answers: list[tuple]) -> str:
    for text, start in answers:
        if not isinstance(text, str) or not text.strip():
            return "an answer text is empty or not a string"
        if isinstance(start, (bool, np.bool_)) or not isinstance(start, (int, np.integer)):
            return "an answer_start is not an integer"
        if start < 0:
            return "an answer_start is negative"
        if context[start : start + len(text)] != text:
            return ("answer not found in its context" if text not in context
                    else "answer_start does not match the answer text")
    return ""


def check_qa_rows(batch: dict, *, question: str, context: str, answers: str, seed: int, val_fraction: float,
                  test_fraction: float) -> dict:
    """Each row's question, context, answers (JSON), split, and why it is bad ('' if good)."""
    out = {k: [] for k in ("id", "question", "context", "answers", "reason", "split", "answerable")}
    ids = batch.get("id", [None] * len(batch[question]))
    for i, (q, c, a) in enumerate(zip(batch[question], batch[context], batch[answers])):
        parsed = _answers_of(a)
        if not isinstance(q, str) or not isinstance(c, str):
            reason = f"{question if not isinstance(q, str) else context} is not a string"
        elif not q.strip() or not c.strip():
            reason = f"empty {question if not q.strip() else context}"
        elif parsed is None:
            reason = f"{answers} is not a list of {{text, answer_start}}"
        else:
            reason = _answer_problem(c, parsed)
        good = not reason
        key = ids[i] if isinstance(ids[i], str) and ids[i] else f"{q}\0{c}"
        out["id"].append(str(key) if good else "")
        out["question"].append(q if good else "")
        out["context"].append(c if good else "")
        out["answers"].append(json.dumps([[t, int(s)] for t, s in parsed]) if good else "[]")
        out["reason"].append(reason)
        out["split"].append(split_of(c, seed, val_fraction, test_fraction) if good else "")
        out["answerable"].append(bool(good and parsed))
    return {k: np.array(v, dtype=bool if k == "answerable" else object) for k, v in out.items()}


# ---- windows -----------------------------------------------------------------------------

def question_budget(max_length: int) -> int:
    """The most question tokens a window takes: half of what [CLS], [SEP], [SEP] leave, so the
    context always has at least as much room, more than data.doc_stride (a config check), and
    each window moves on by at least room - doc_stride tokens."""
    return (max_length - 3) // 2


def question_lengths(tok, questions: list[str]) -> list[int]:
    return [len(ids) for ids in tok(questions, add_special_tokens=False)["input_ids"]]


def cut_questions(tok, questions: list[str], max_length: int) -> list[str]:
    """Questions longer than question_budget tokens, cut after their last token that fits."""
    budget = question_budget(max_length)
    enc = tok(questions, add_special_tokens=False, truncation=True, max_length=budget, return_offsets_mapping=True)
    return [q[: offsets[-1][1]] if len(ids) >= budget and offsets else q
            for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"])]


def tokenize_windows(batch: dict, *, folder: str, max_length: int, doc_stride: int) -> dict:
    """Each (question, context) as one or more windows of max_length tokens, overlapping by
    doc_stride tokens, with the first answer's token span where a window holds it whole and
    (0, 0), the [CLS] token, where it does not (a Ray Data map_batches function). A question
    past question_budget tokens is cut to it."""
    from raydistill.text.data import load_tokenizer

    tok = load_tokenizer(folder)
    questions, contexts = cut_questions(tok, batch["question"].tolist(), max_length), batch["context"].tolist()
    enc = tok(questions, contexts, truncation="only_second", max_length=max_length, stride=doc_stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
              return_token_type_ids=True)
    out = {k: [] for k in (*TOKEN_COLUMNS, *TARGETS, *SPAN_COLUMNS)}
    for w, owner in enumerate(enc["overflow_to_sample_mapping"]):
        in_context = np.array([s == 1 for s in enc.sequence_ids(w)])
        offsets = np.array(enc["offset_mapping"][w], dtype=np.int32).reshape(-1, 2)
        starts = np.where(in_context, offsets[:, 0], -1)
        ends = np.where(in_context, offsets[:, 1], -1)
        answers = json.loads(batch["answers"][owner])
        span = (0, 0)
        if answers:
            text, char_start = answers[0]
            char_end = char_start + len(text)
            inside = np.flatnonzero(in_context)
            if len(inside) and starts[inside[0]] <= char_start and char_end <= ends[inside[-1]]:
                span = (int(inside[starts[inside] <= char_start][-1]), int(inside[ends[inside] >= char_end][0]))
        for k in TOKEN_COLUMNS:
            out[k].append(np.asarray(enc[k][w], dtype=np.int32))
        out["start_positions"].append(span[0])
        out["end_positions"].append(span[1])
        out["offset_start"].append(starts.astype(np.int32))
        out["offset_end"].append(ends.astype(np.int32))
        out["example"].append(batch["id"][owner])
    return {k: (np.stack(v) if k in (*TOKEN_COLUMNS, "offset_start", "offset_end")
                else np.array(v, dtype=object if k == "example" else np.int32)) for k, v in out.items()}


# ---- decoding spans ----------------------------------------------------------------------

def mask_outside(logits, attention_mask):
    """Start/end logits (B, L, 2) with padding pushed to -1e4: padding is never an answer."""
    return logits.masked_fill(~attention_mask.bool().unsqueeze(-1), -1e4)


def window_spans(logits: np.ndarray, offset_start: np.ndarray, offset_end: np.ndarray,
                 max_answer_tokens: int) -> list[tuple[float, float, int, int]]:
    """For each window (logits (L, 2) each, offsets cut to the same L): the best context span
    as (start+end logit, probability, char start, char end), and the no-answer score
    start[0]+end[0] as a fifth value. The search is the usual n-best one: the N_BEST highest
    starts and ends, an end not before its start, at most max_answer_tokens tokens."""
    out = []
    for lg, os_, oe in zip(logits, offset_start, offset_end):
        length = min(len(lg), len(os_))
        lg, os_, oe = lg[:length], os_[:length], oe[:length]
        valid = os_ >= 0
        if not valid.any():
            out.append((-np.inf, 0.0, 0, 0, float(lg[0, 0] + lg[0, 1])))
            continue
        start = np.where(valid, lg[:, 0], -np.inf)
        end = np.where(valid, lg[:, 1], -np.inf)
        log_p_start = start - np.logaddexp.reduce(start[valid])
        log_p_end = end - np.logaddexp.reduce(end[valid])
        s_idx = np.argsort(-start)[:N_BEST]
        e_idx = np.argsort(-end)[:N_BEST]
        s, e = np.meshgrid(s_idx, e_idx, indexing="ij")
        ok = (e >= s) & (e - s + 1 <= max_answer_tokens) & valid[s] & valid[e]
        score = np.where(ok, start[s] + end[e], -np.inf)
        i, j = np.unravel_index(np.argmax(score), score.shape)
        if not np.isfinite(score[i, j]):
            out.append((-np.inf, 0.0, 0, 0, float(lg[0, 0] + lg[0, 1])))
            continue
        bs, be = int(s[i, j]), int(e[i, j])
        prob = float(np.exp(log_p_start[bs] + log_p_end[be]))
        out.append((float(score[i, j]), prob, int(os_[bs]), int(oe[be]), float(lg[0, 0] + lg[0, 1])))
    return out


def best_answers(window_results: list[tuple[str, tuple]], contexts: dict[str, str],
                 allow_no_answer: bool) -> dict[str, tuple[str, int, int, float]]:
    """Per example: (answer text, char start, char end, probability) from its windows' best
    spans; with allow_no_answer (SQuAD v2.0) the empty answer when the lowest no-answer score
    beats the best span, as Hugging Face's QA post-processing decides."""
    best: dict[str, tuple] = {}
    null: dict[str, float] = {}
    for example, (score, prob, cs, ce, null_score) in window_results:
        if example not in best or score > best[example][0]:
            best[example] = (score, prob, cs, ce)
        null[example] = min(null.get(example, np.inf), null_score)
    out = {}
    for example, (score, prob, cs, ce) in best.items():
        if not np.isfinite(score) or (allow_no_answer and null[example] > score):
            out[example] = ("", 0, 0, 0.0)
        else:
            out[example] = (contexts[example][cs:ce], cs, ce, prob)
    return out


# ---- SQuAD's metrics ---------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD's)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # an unanswerable question: right only if both are empty
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 (fractions; the SQuAD script prints them x100), each the best over
    an example's gold answers, averaged over every gold example (an unpredicted one scores 0).
    An unanswerable example's gold answer is the empty string."""
    em = f1 = 0.0
    for example, answers in golds.items():
        answers = [a for a in answers if normalize_answer(a)] or [""]  # as the script: "the" counts as no answer
        pred = predictions.get(example)
        if pred is None:
            continue
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(f1_score(pred, a) for a in answers)
    n = max(1, len(golds))
    return {"exact_match": em / n, "f1": f1 / n, "examples": len(golds)}
