"""Ray Serve for a text student: Open Inference Protocol v2 with a BYTES input named `text`
(and `text_pair` for pair tasks), as the spec and tritonclient encode strings in JSON and in
the binary extension, and POST /predict with JSON for people.

Tokenization runs in the replica; requests are batched across callers (@serve.batch), and each
forward pass pads its rows to the longest of them. A text past deploy.max_text_bytes is a 413,
one past deploy.max_text_tokens a 400; texts between the model's max_length and that limit are
cut to max_length, as in training.
"""

# No `from __future__ import annotations`: FastAPI must see real types in the replica.

import json
import math
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
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

text_api = install_error_handlers(FastAPI(
    title="raydistill (text)",
    description="A distilled text classifier. Open Inference Protocol v2 (BYTES input 'text') under /v2; "
                "POST /predict with {\"text\": ...} or {\"instances\": [{\"text\": ...}]}.",
))
PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        "text": {"type": "string"}, "text_pair": {"type": "string"},
        "instances": {"type": "array", "items": {"type": "object", "required": ["text"], "properties": {
            "text": {"type": "string"}, "text_pair": {"type": "string"}}}}}}}}}}


class TextPredictor:
    """Texts -> class probabilities, with the student's ONNX file (fp32 or int8) in ONNX Runtime
    or its PyTorch weights; every file checked against its sha256 before use."""

    def __init__(self, model: ServedModel, threads: int):
        from raydistill.artifacts import load_weights
        from raydistill.text.data import load_tokenizer

        state, meta = load_weights(Path(model.weights), model.sha256)
        self.meta = meta
        self.class_names = json.loads(meta.get("class_names", "null"))
        self.max_length = int(meta.get("max_length", 512))
        self.has_pair = meta.get("has_pair") == "true"
        self.tokenizer = load_tokenizer(model.tokenizer)
        if model.onnx is not None:
            from raydistill.compress import onnx_session

            self.platform = "onnxruntime_onnx"
            self.session = onnx_session(Path(model.onnx), model.onnx_sha256, threads=threads)
            self.num_classes = int(self.session.get_outputs()[0].shape[-1])
            return
        import torch

        from raydistill.text.models import model_from_meta

        torch.set_num_threads(threads)
        self.platform, self.session = "pytorch_torchscript", None
        self.model = model_from_meta(meta)
        self.model.load_state_dict(state, strict=False)
        self.model.eval()
        self.num_classes = self.model.config.num_labels

    def token_counts(self, texts: list[str], pairs: list[str] | None) -> list[int]:
        enc = self.tokenizer(texts, pairs, truncation=False, add_special_tokens=True)
        return [len(ids) for ids in enc["input_ids"]]

    def __call__(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding="longest",
                             return_token_type_ids=True, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in INPUTS}
        if self.session is not None:
            return softmax(self.session.run(["logits"], feed)[0])
        import torch

        with torch.inference_mode():
            logits = self.model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
            return torch.softmax(logits, dim=-1).float().numpy()


@serve.deployment
@serve.ingress(text_api)
class TextServer(RequestPlumbing):
    """One replica: the text student, with requests batched across callers."""

    def __init__(self, model: ServedModel, deploy: dict, version: str):
        self.cfg = DeployConfig.model_validate(deploy)
        self.api_key = read_api_key(self.cfg)
        self.predictor = TextPredictor(model, max(1, int(self.cfg.replica_cpus)))
        self.version = version
        self.decoder = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="tokenize")
        self._forward.set_max_batch_size(self.cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both set from config in __init__
    async def _forward(self, requests: list[tuple[list[str], list[str] | None]]) -> list[np.ndarray]:
        """Many requests' texts -> forward passes of at most deploy.max_batch_items texts, each
        padded to its longest row -> per-request probabilities."""
        texts = [t for r in requests for t in r[0]]
        pairs = [p for r in requests for p in r[1]] if self.predictor.has_pair else None
        step = self.cfg.max_batch_items
        probs = np.concatenate([
            await self._off_loop(self.predictor, texts[i : i + step], pairs[i : i + step] if pairs else None)
            for i in range(0, len(texts), step)])
        return np.split(probs, np.cumsum([len(r[0]) for r in requests])[:-1])

    def _check_texts(self, texts: list, pairs: list | None) -> tuple[list[str], list[str] | None]:
        """Strings within the limits, or a 4xx naming the first that is not."""
        if not texts:
            raise BadRequest("no text given: send at least one")
        if len(texts) > self.cfg.max_request_images:
            raise BadRequest(f"{len(texts)} texts exceed the limit of {self.cfg.max_request_images} per request "
                             "(deploy.max_request_images)", 413)
        if self.predictor.has_pair and (pairs is None or len(pairs) != len(texts)):
            raise BadRequest(f"this model reads text pairs: send '{PAIR}' beside every '{TEXT}'")
        if not self.predictor.has_pair and pairs is not None:
            raise BadRequest(f"this model reads single texts; '{PAIR}' is not accepted")
        for i, t in enumerate(texts + (pairs or [])):
            if not isinstance(t, str):
                raise BadRequest(f"text {i}: expected a string, got {type(t).__name__}")
            if not t.strip():
                raise BadRequest(f"text {i} is empty")
            size = len(t.encode("utf-8", "surrogatepass"))
            if size > self.cfg.max_text_bytes:
                raise BadRequest(f"text {i} has {size} bytes, past the limit of {self.cfg.max_text_bytes} "
                                 "(deploy.max_text_bytes)", 413)
        return texts, pairs

    async def _predict_probs(self, texts: list, pairs: list | None) -> np.ndarray:
        texts, pairs = self._check_texts(texts, pairs)
        counts = await self._off_loop(self.predictor.token_counts, texts, pairs)
        over = [(i, n) for i, n in enumerate(counts) if n > self.cfg.max_text_tokens]
        if over:
            i, n = over[0]
            raise BadRequest(f"text {i} has {n} tokens, past the limit of {self.cfg.max_text_tokens} "
                             "(deploy.max_text_tokens)")
        return await self._forward((texts, pairs))

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
        inputs = [{"name": TEXT, "datatype": "BYTES", "shape": [-1]}]
        if self.predictor.has_pair:
            inputs.append({"name": PAIR, "datatype": "BYTES", "shape": [-1]})
        return {
            "name": self.cfg.model_name, "versions": [self.version], "platform": self.predictor.platform,
            "inputs": inputs,
            "outputs": [{"name": PROBS_NAME, "datatype": "FP32", "shape": [-1, self.predictor.num_classes]},
                        {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]}],
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
        wanted_inputs = {TEXT, PAIR} if self.predictor.has_pair else {TEXT}
        try:
            payload, arrays = await self._off_loop(
                decode_request, body, request.headers.get(HEADER_LENGTH), self.cfg.max_json_depth,
                self.cfg.max_request_images)
            del body
            if set(arrays) != wanted_inputs:
                raise ProtocolError(f"expected input(s) named {sorted(wanted_inputs)}, got {sorted(arrays)}")
            for tensor in payload["inputs"]:
                if tensor["datatype"] != "BYTES":
                    raise ProtocolError(f"input '{tensor['name']}' must be BYTES (UTF-8 text), got {tensor['datatype']!r}")
            if math.prod(arrays[TEXT].shape) != len(arrays[TEXT].reshape(-1)) or arrays[TEXT].ndim > 2:
                raise ProtocolError(f"input '{TEXT}' must have shape [batch] or [batch, 1]")
            wanted = requested_outputs(payload, [PROBS_NAME, LABEL_NAME])
        except ProtocolError as err:
            raise BadRequest(str(err), err.status) from None
        texts = arrays[TEXT].reshape(-1).tolist()
        pairs = arrays[PAIR].reshape(-1).tolist() if PAIR in arrays else None
        header = {"model_name": self.cfg.model_name, "model_version": self.version}
        if "id" in payload:
            header["id"] = payload["id"]
        probs = await self._predict_probs(texts, pairs)
        tensors = {PROBS_NAME: probs.astype(np.float32), LABEL_NAME: probs.argmax(1).astype(np.int64)}
        content, headers = encode_response(header, [(n, tensors[n], binary) for n, binary in wanted])
        return Response(content=content, headers=headers)

    # ---- for people -----------------------------------------------------------------------

    @text_api.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request) -> dict:
        """{"text": "..."} (and "text_pair" for pair models) or {"instances": [{"text": "..."}, ...]}."""
        self._authorize(request)
        _check_content_type(request, ("application/json",))
        payload = await self._read_json(request)
        if "instances" in payload:
            instances = payload["instances"]
            if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
                raise BadRequest("'instances' must be a list of objects, each {\"text\": \"...\"}")
        elif TEXT in payload:
            instances = [payload]
        else:
            raise BadRequest("JSON body needs 'text' (a string) or 'instances' (a list of {\"text\": ...})")
        if len(instances) > self.cfg.max_request_images:
            raise BadRequest(f"{len(instances)} instances exceed the limit of {self.cfg.max_request_images} "
                             "(deploy.max_request_images)", 413)
        unknown = sorted({k for i in instances for k in i} - {TEXT, PAIR})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; an instance holds '{TEXT}' (and '{PAIR}')")
        if any(TEXT not in i for i in instances):
            raise BadRequest(f"every instance needs '{TEXT}'")
        texts = [i[TEXT] for i in instances]
        pairs = [i.get(PAIR) for i in instances] if any(PAIR in i for i in instances) else None
        probs = await self._predict_probs(texts, pairs)
        return {"model_name": self.cfg.model_name, "model_version": self.version,
                "predictions": self._named(probs)}

    def _named(self, probs: np.ndarray) -> list[dict]:
        names = self.predictor.class_names
        out = []
        for row in probs:
            order = np.argsort(-row)[:TOP_K]
            top = [{"label": int(i), **({"class_name": names[i]} if names else {}), "probability": float(row[i])}
                   for i in order]
            out.append({**top[0], "top_k": top})
        return out


def build_text_app(model: ServedModel, deploy: DeployConfig, version: str):
    from raydistill.serving import deployment_options

    return TextServer.options(**deployment_options(deploy)).bind(model, deploy.model_dump(mode="json"), version)
