"""Ray Serve for a text student: Open Inference Protocol v2 with BYTES inputs (`text`, and
`text_pair` for pair tasks; `question` and `context` for question answering), as the spec and
tritonclient encode strings in JSON and in the binary extension, and POST /predict with JSON
for people. A QA model answers with the span's text (BYTES), its character start and end in
the context, and its probability.

Tokenization runs in the replica; requests are batched across callers (@serve.batch), and each
forward pass pads its rows to the longest of them. A text past deploy.max_text_bytes is a 413,
one past deploy.max_text_tokens a 400; texts between the model's max_length and that limit are
cut to max_length, as in training.
"""

# No `from __future__ import annotations`: FastAPI must see real types in the replica.

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from raydistill.config import DeployConfig
from raydistill.inference_protocol import (EXTENSIONS, HEADER_LENGTH, ProtocolError, decode_request, encode_response,
                                           requested_outputs)
from raydistill.serving import (INFER_TYPES, LABEL_NAME, PROBS_NAME, TOP_K, BadRequest, RequestPlumbing, ServedModel,
                                _check_content_type, install_error_handlers, read_api_key, softmax)

TEXT, PAIR = "text", "text_pair"
QUESTION, CONTEXT = "question", "context"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WINDOWS_PER_FORWARD = 64

text_api = install_error_handlers(FastAPI(
    title="raydistill (text)",
    description="A distilled text model. Open Inference Protocol v2 (BYTES inputs 'text', or 'question' and "
                "'context') under /v2; POST /predict with {\"text\": ...} or {\"question\": ..., \"context\": ...}, "
                "or {\"instances\": [...]} of either.",
))
_STR = {"type": "string"}
PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        TEXT: _STR, PAIR: _STR, QUESTION: _STR, CONTEXT: _STR,
        "instances": {"type": "array", "items": {"type": "object", "properties": {
            TEXT: _STR, PAIR: _STR, QUESTION: _STR, CONTEXT: _STR}}}}}}}}}


class _Predictor:
    """What every text task's predictor shares: the weights checked against their sha256, the
    tokenizer, and the student as ONNX (fp32 or int8) in ONNX Runtime or in PyTorch. A
    subclass is the task's codec: the fields of an item, the forward and its outputs."""

    fields: tuple[str, ...]

    def __init__(self, model: ServedModel, threads: int):
        from raydistill.artifacts import load_weights
        from raydistill.text.data import load_tokenizer

        state, meta = load_weights(Path(model.weights), model.sha256)
        self.meta = meta
        self.max_length = int(meta.get("max_length", 512))
        self.tokenizer = load_tokenizer(model.tokenizer)
        if model.onnx is not None:
            from raydistill.compress import onnx_session

            self.platform, self.model = "onnxruntime_onnx", None
            self.session = onnx_session(Path(model.onnx), model.onnx_sha256, threads=threads)
            return
        import torch

        from raydistill.text.models import TextLogits, model_from_meta

        torch.set_num_threads(threads)
        self.platform, self.session = "pytorch_torchscript", None
        model = model_from_meta(meta)
        model.load_state_dict(state, strict=False)
        self.model = TextLogits(model).eval()

    def logits(self, feed: dict) -> np.ndarray:
        if self.session is not None:
            return self.session.run(["logits"], feed)[0]
        import torch

        with torch.inference_mode():
            return self.model(*(torch.from_numpy(feed[k]) for k in INPUTS)).float().numpy()

    def token_counts(self, items: list[dict]) -> list[int]:
        firsts = [i[self.fields[0]] for i in items]
        seconds = [i[self.fields[1]] for i in items] if len(self.fields) > 1 else None
        enc = self.tokenizer(firsts, seconds, truncation=False, add_special_tokens=True)
        return [len(ids) for ids in enc["input_ids"]]

    def refusal(self, items: list[dict]) -> str | None:
        """Why the model cannot take one of the items (beyond the server's limits), or None."""
        return None


class ClassifierPredictor(_Predictor):
    """Texts (and pairs) -> class probabilities."""

    def __init__(self, model: ServedModel, threads: int):
        super().__init__(model, threads)
        self.class_names = json.loads(self.meta.get("class_names", "null"))
        self.fields = (TEXT, PAIR) if self.meta.get("has_pair") == "true" else (TEXT,)
        self.num_classes = (int(self.session.get_outputs()[0].shape[-1]) if self.session is not None
                            else self.model.model.config.num_labels)

    def __call__(self, items: list[dict]) -> list[np.ndarray]:
        pairs = [i[PAIR] for i in items] if PAIR in self.fields else None
        enc = self.tokenizer([i[TEXT] for i in items], pairs, truncation=True, max_length=self.max_length,
                             padding="longest", return_token_type_ids=True, return_tensors="np")
        return list(softmax(self.logits({k: enc[k].astype(np.int64) for k in INPUTS})))

    def outputs(self) -> list[dict]:
        return [{"name": PROBS_NAME, "datatype": "FP32", "shape": [-1, self.num_classes]},
                {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]}]

    def tensors(self, results: list) -> dict[str, np.ndarray]:
        probs = np.stack(results).astype(np.float32)
        return {PROBS_NAME: probs, LABEL_NAME: probs.argmax(1).astype(np.int64)}

    def named(self, row: np.ndarray) -> dict:
        names = self.class_names
        top = [{"label": int(i), **({"class_name": names[i]} if names else {}), "probability": float(row[i])}
               for i in np.argsort(-row)[:TOP_K]]
        return {**top[0], "top_k": top}


class AnswerPredictor(_Predictor):
    """(question, context) -> the answer span: the context cut into windows as in training,
    every window scored, the best span over them decoded to characters."""

    fields = (QUESTION, CONTEXT)

    def __init__(self, model: ServedModel, threads: int):
        super().__init__(model, threads)
        self.doc_stride = int(self.meta.get("doc_stride", 32))
        self.max_answer_tokens = int(self.meta.get("max_answer_tokens", 30))
        self.allow_no_answer = self.meta.get("allow_no_answer") == "true"

    def refusal(self, items: list[dict]) -> str | None:
        from raydistill.text import qa

        budget = qa.question_budget(self.max_length)
        lengths = qa.question_lengths(self.tokenizer, [i[QUESTION] for i in items])
        over = [(n, length) for n, length in enumerate(lengths) if length > budget]
        if over:
            n, length = over[0]
            return (f"question {n} has {length} tokens; this model reads questions of at most {budget} "
                    f"(half of its {self.max_length}-token window)")
        return None

    def __call__(self, items: list[dict]) -> list[tuple]:
        from raydistill.text import qa

        enc = self.tokenizer([i[QUESTION] for i in items], [i[CONTEXT] for i in items], truncation="only_second",
                             max_length=self.max_length, stride=self.doc_stride, return_overflowing_tokens=True,
                             return_offsets_mapping=True, padding="longest", return_token_type_ids=True)
        feed = {k: np.asarray(enc[k], dtype=np.int64) for k in INPUTS}
        step = WINDOWS_PER_FORWARD  # a long context makes many windows: bounded memory per forward
        logits = np.concatenate([self.logits({k: v[i : i + step] for k, v in feed.items()})
                                 for i in range(0, len(feed["input_ids"]), step)])
        logits = np.where(feed["attention_mask"][..., None].astype(bool), logits, -1e4)
        owners = [str(o) for o in enc["overflow_to_sample_mapping"]]
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64)
        in_context = np.array([[s == 1 for s in enc.sequence_ids(w)] for w in range(len(owners))])
        spans = qa.window_spans(logits, np.where(in_context, offsets[..., 0], -1), np.where(in_context, offsets[..., 1], -1),
                                self.max_answer_tokens)
        answers = qa.best_answers(list(zip(owners, spans)), {str(n): i[CONTEXT] for n, i in enumerate(items)},
                                  self.allow_no_answer)
        return [answers[str(n)] for n in range(len(items))]

    def outputs(self) -> list[dict]:
        return [{"name": "answer", "datatype": "BYTES", "shape": [-1]},
                {"name": "start", "datatype": "INT64", "shape": [-1]},
                {"name": "end", "datatype": "INT64", "shape": [-1]},
                {"name": "score", "datatype": "FP32", "shape": [-1]}]

    def tensors(self, results: list) -> dict[str, np.ndarray]:
        return {"answer": np.array([r[0] for r in results], dtype=object),
                "start": np.array([r[1] for r in results], dtype=np.int64),
                "end": np.array([r[2] for r in results], dtype=np.int64),
                "score": np.array([r[3] for r in results], dtype=np.float32)}

    def named(self, result: tuple) -> dict:
        return {"answer": result[0], "start": int(result[1]), "end": int(result[2]), "score": float(result[3])}


def predictor_of(model: ServedModel, threads: int) -> _Predictor:
    from raydistill.artifacts import read_meta

    task = read_meta(Path(model.weights)).get("task")
    return (AnswerPredictor if task == "question_answering" else ClassifierPredictor)(model, threads)


@serve.deployment
@serve.ingress(text_api)
class TextServer(RequestPlumbing):
    """One replica: the text student, with requests batched across callers."""

    def __init__(self, model: ServedModel, deploy: dict, version: str):
        self.cfg = DeployConfig.model_validate(deploy)
        self.api_key = read_api_key(self.cfg)
        self.predictor = predictor_of(model, max(1, int(self.cfg.replica_cpus)))
        self.version = version
        self.decoder = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="tokenize")
        self._forward.set_max_batch_size(self.cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both set from config in __init__
    async def _forward(self, requests: list[list[dict]]) -> list[list]:
        """Many requests' items -> forward passes of at most deploy.max_batch_items items, each
        padded to its longest row -> per-request results."""
        items = [i for r in requests for i in r]
        step = self.cfg.max_batch_items
        results = []
        for i in range(0, len(items), step):
            results.extend(await self._off_loop(self.predictor, items[i : i + step]))
        ends = np.cumsum([len(r) for r in requests])
        return [results[e - len(r) : e] for r, e in zip(requests, ends)]

    def _check_items(self, items: list[dict]) -> list[dict]:
        """Items holding exactly the model's fields, each a string within the limits, or a 4xx
        naming the first that is not."""
        fields = self.predictor.fields
        if not items:
            raise BadRequest("no text given: send at least one")
        if len(items) > self.cfg.max_request_images:
            raise BadRequest(f"{len(items)} texts exceed the limit of {self.cfg.max_request_images} per request "
                             "(deploy.max_request_images)", 413)
        for n, item in enumerate(items):
            if set(item) != set(fields):
                if fields == (TEXT,) and PAIR in item:
                    raise BadRequest(f"this model reads single texts; '{PAIR}' is not accepted")
                raise BadRequest(f"item {n}: this model reads {' and '.join(map(repr, fields))}, got "
                                 f"{', '.join(map(repr, sorted(item))) or 'nothing'}")
            for name in fields:
                t = item[name]
                if not isinstance(t, str):
                    raise BadRequest(f"{name} {n}: expected a string, got {type(t).__name__}")
                if not t.strip():
                    raise BadRequest(f"{name} {n} is empty")
                size = len(t.encode("utf-8", "surrogatepass"))
                if size > self.cfg.max_text_bytes:
                    raise BadRequest(f"{name} {n} has {size} bytes, past the limit of {self.cfg.max_text_bytes} "
                                     "(deploy.max_text_bytes)", 413)
        return items

    async def _predict(self, items: list[dict]) -> list:
        items = self._check_items(items)
        refusal = await self._off_loop(self.predictor.refusal, items)
        if refusal:
            raise BadRequest(refusal)
        counts = await self._off_loop(self.predictor.token_counts, items)
        over = [(i, n) for i, n in enumerate(counts) if n > self.cfg.max_text_tokens]
        if over:
            i, n = over[0]
            raise BadRequest(f"text {i} has {n} tokens, past the limit of {self.cfg.max_text_tokens} "
                             "(deploy.max_text_tokens)")
        return await self._forward(items)

    # ---- Open Inference Protocol v2 ------------------------------------------------------

    @text_api.get("/v2/health/live")
    def live(self) -> dict:
        return {"live": True, "extensions": EXTENSIONS}

    @text_api.get("/v2/health/ready")
    def ready(self) -> dict:
        return {"ready": True, "extensions": EXTENSIONS}

    @text_api.get("/v2")
    def server_metadata(self, request: Request) -> dict:
        self._authorize(request)
        return {"name": "raydistill", "version": "2", "extensions": EXTENSIONS}

    @text_api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name)
        return {
            "name": self.cfg.model_name, "versions": [self.version], "platform": self.predictor.platform,
            "inputs": [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in self.predictor.fields],
            "outputs": self.predictor.outputs(),
        }

    @text_api.get("/v2/models/{name}/versions/{version}")
    def model_version_metadata(self, name: str, version: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name, version)
        return self.model_metadata(name, request)

    @text_api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name)
        return {"name": name, "ready": True}

    @text_api.get("/v2/models/{name}/versions/{version}/ready")
    def model_version_ready(self, name: str, version: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name, version)
        return {"name": name, "ready": True}

    @text_api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        return await self._infer(name, None, request)

    @text_api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._infer(name, version, request)

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        self._authorize(request)
        self._check_model(name, version)
        _check_content_type(request, INFER_TYPES)
        body = await self._read_body(request)
        fields = self.predictor.fields
        try:
            payload, arrays = await self._off_loop(
                decode_request, body, request.headers.get(HEADER_LENGTH), self.cfg.max_json_depth,
                self.cfg.max_request_images)
            del body
            if set(arrays) != set(fields):
                raise ProtocolError(f"expected input(s) named {sorted(fields)}, got {sorted(arrays)}")
            for tensor in payload["inputs"]:
                if tensor["datatype"] != "BYTES":
                    raise ProtocolError(f"input '{tensor['name']}' must be BYTES (UTF-8 text), got {tensor['datatype']!r}")
            columns = {}
            for name in fields:
                if arrays[name].ndim > 2 or (arrays[name].ndim == 2 and arrays[name].shape[1] != 1):
                    raise ProtocolError(f"input '{name}' must have shape [batch] or [batch, 1]")
                columns[name] = arrays[name].reshape(-1).tolist()
            if len({len(c) for c in columns.values()}) > 1:
                raise ProtocolError(f"inputs {sorted(fields)} must hold as many elements each")
            wanted = requested_outputs(payload, [o["name"] for o in self.predictor.outputs()])
        except ProtocolError as err:
            raise BadRequest(str(err), err.status) from None
        items = [dict(zip(fields, values)) for values in zip(*(columns[f] for f in fields))]
        header = {"model_name": self.cfg.model_name, "model_version": self.version}
        if "id" in payload:
            header["id"] = payload["id"]
        tensors = self.predictor.tensors(await self._predict(items))
        content, headers = encode_response(header, [(n, tensors[n], binary) for n, binary in wanted])
        return Response(content=content, headers=headers)

    # ---- for people -----------------------------------------------------------------------

    @text_api.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request) -> dict:
        """{"text": "..."} ({"question": ..., "context": ...} for QA models), or {"instances": [...]} of them."""
        self._authorize(request)
        _check_content_type(request, ("application/json",))
        payload = await self._read_json(request)
        fields = self.predictor.fields
        example = "{" + ", ".join(f'"{f}": "..."' for f in fields) + "}"
        if "instances" in payload:
            instances = payload["instances"]
            if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
                raise BadRequest(f"'instances' must be a list of objects, each {example}")
        elif fields[0] in payload:
            instances = [payload]
        else:
            raise BadRequest(f"JSON body needs {example} or 'instances' (a list of them)")
        if len(instances) > self.cfg.max_request_images:
            raise BadRequest(f"{len(instances)} instances exceed the limit of {self.cfg.max_request_images} "
                             "(deploy.max_request_images)", 413)
        unknown = sorted({k for i in instances for k in i} - {*fields, PAIR})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; an instance holds {example}")
        predictions = [self.predictor.named(r) for r in await self._predict(instances)]
        reply = {"model_name": self.cfg.model_name, "model_version": self.version, "predictions": predictions}
        if "instances" not in payload and isinstance(self.predictor, AnswerPredictor):
            reply.update(predictions[0])  # {"question", "context"} -> {"answer", "start", "end", "score"}
        return reply


def build_text_app(model: ServedModel, deploy: DeployConfig, version: str):
    from raydistill.serving import deployment_options

    return TextServer.options(**deployment_options(deploy)).bind(model, deploy.model_dump(mode="json"), version)
