"""Ray Serve: the student behind the Open Inference Protocol v2 (REST) and a /predict route
for people. Requests are batched across callers with @serve.batch.

Every client mistake is a 4xx whose body says what was wrong: {"error": "..."}, FastAPI's own
404/405/422 included. Each limit (deploy.max_request_bytes, max_request_images, max_image_pixels,
max_json_depth, max_batch_items) is enforced before the work it guards: bodies are counted as
they stream in, image sizes are read from headers before decoding, and decoding runs in a
bounded thread pool, off the replica's event loop.
"""

# No `from __future__ import annotations`: FastAPI must see real types in the replica.

import asyncio
import hmac
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from raydistill.config import DeployConfig
from raydistill.inference_protocol import (EXTENSIONS, HEADER_LENGTH, ProtocolError, decode_request, encode_response,
                                           loads, requested_outputs)

INPUT_NAME, PROBS_NAME, LABEL_NAME = "pixels", "probabilities", "label"
TOP_K = 3

# Request bodies are read by hand (binary tensor extension, multipart); document them for
# /docs, for client generators and for schemathesis.
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "example": "pixels"},
        "shape": {"type": "array", "items": {"type": "integer"}, "example": [1, 1, 8, 8]},
        "datatype": {"type": "string", "example": "FP32"},
        "data": {"type": "array", "items": {"type": "number"}},
        "parameters": {"type": "object"},
    },
}
INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"],
    "properties": {"id": {"type": "string"}, "inputs": {"type": "array", "items": _TENSOR},
                   "outputs": {"type": "array", "items": {"type": "object"}}, "parameters": {"type": "object"}},
}}}}}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["instances"], "properties": {
        "instances": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}

api = FastAPI(
    title="raydistill",
    description="A distilled image classifier. Open Inference Protocol v2 under /v2; POST /predict for people.",
)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def _bad_request(_: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """The framework's own errors: unknown route (404), wrong method (405)."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse({"error": message.get(err.status_code, str(err.detail))}, status_code=err.status_code,
                        headers=getattr(err, "headers", None))


async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
    return JSONResponse({"error": f"invalid request: {where}"}, status_code=422)


def install_error_handlers(app: FastAPI) -> FastAPI:
    """Every error an app answers is {"error": "..."}, its own and the framework's alike."""
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    return app


install_error_handlers(api)


# What each route reads; a request without a Content-Type is read as the route's default.
INFER_TYPES = ("application/json", "application/octet-stream")  # octet-stream: the binary extension
PREDICT_TYPES = ("application/json", "multipart/form-data")


def _check_content_type(request: Request, accepted: tuple[str, ...]) -> str:
    """The request's media type (parameters dropped, lower case), or 415 naming what the
    route accepts."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in accepted:
        raise BadRequest(f"content-type {kind} is not accepted here; send {' or '.join(accepted)}", status=415)
    return kind


def check_pixels(arr: np.ndarray, expected: tuple[int, int, int], max_images: int) -> np.ndarray:
    """A batch of images as float32 (B, C, H, W) on 0..1, or BadRequest saying what is wrong."""
    if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
        raise BadRequest(f"input shape {list(arr.shape)} does not match [batch, {', '.join(map(str, expected))}]")
    if arr.shape[0] < 1:
        raise BadRequest("empty batch: the first dimension must be at least 1")
    if arr.shape[0] > max_images:
        raise BadRequest(f"batch of {arr.shape[0]} images exceeds the limit of {max_images}", status=413)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise BadRequest("'data' holds NaN or infinite values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise BadRequest("pixel values must lie in [0, 1]")
    return arr


def decode_upload(raw: bytes, expected: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    """A PNG/JPEG upload -> float32 (C, H, W) on 0..1 at the model's input size. Its size is
    read from the header and refused past `max_pixels` before any pixel is decoded."""
    from PIL import Image

    channels, height, width = expected
    try:
        with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG")) as img:
            if img.width * img.height > max_pixels:
                raise BadRequest(f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels} "
                                 "(deploy.max_image_pixels)", status=413)
            img.draft("L" if channels == 1 else "RGB", (width, height))  # JPEG: decode at a reduced scale
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except BadRequest:
        raise
    except Image.DecompressionBombError:  # past twice Pillow's own limit: refused by Image.open
        raise BadRequest(f"image exceeds the limit of {max_pixels} pixels (deploy.max_image_pixels)", 413) from None
    except Exception:  # the bytes are the client's: whatever the decoder trips on is their mistake
        raise BadRequest("upload is not a decodable PNG or JPEG image") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def top_k(probs: np.ndarray, k: int = TOP_K) -> list[dict]:
    out = []
    for row in probs:
        order = np.argsort(-row)[:k]
        out.append({
            "label": int(order[0]),
            "probability": float(row[order[0]]),
            "top_k": [{"label": int(i), "probability": float(row[i])} for i in order],
        })
    return out


def read_api_key(deploy: DeployConfig) -> str | None:
    """The configured API key, or None when the API is open. Raises if it is configured but empty."""
    if deploy.api_key_env:
        key = os.environ.get(deploy.api_key_env, "").strip()
        source = f"env var {deploy.api_key_env}"
    elif deploy.api_key_file:
        try:
            key = Path(deploy.api_key_file).expanduser().read_text().strip()
        except OSError as err:
            raise ValueError(f"deploy.api_key_file: cannot read {deploy.api_key_file} ({err.strerror})") from None
        source = deploy.api_key_file
    else:
        return None
    if not key:
        raise ValueError(f"deploy: the API key in {source} is empty")
    return key


class ServedModel(NamedTuple):
    """The files a replica loads, each with the sha256 it must still have. With `onnx`, the
    replicas run that file in ONNX Runtime; `weights` still gives the model's spec."""

    weights: str
    sha256: str | None
    onnx: str | None = None
    onnx_sha256: str | None = None
    tokenizer: str | None = None  # text models: the tokenizer folder the replica encodes with


def forward_in_chunks(predict, pixels: np.ndarray, max_items: int) -> np.ndarray:
    """predict(pixels) run on slices of at most `max_items` images: memory per forward pass is
    bounded by the config, not by how many images the batched requests carry together."""
    parts = [predict(pixels[i : i + max_items]) for i in range(0, len(pixels), max_items)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Raw pixels (B, C, H, W) float32 on 0..1 -> class probabilities (B, classes), with the
    student's ONNX file (fp32 or int8) in ONNX Runtime, or its PyTorch weights. Every file is
    checked against its sha256 before use."""

    def __init__(self, model: ServedModel, threads: int, use_gpu: bool = False):
        import torch

        from raydistill.artifacts import load_weights
        from raydistill.models import Classifier, ModelSpec, load_network

        state, meta = load_weights(Path(model.weights), model.sha256)
        self.spec = ModelSpec.from_meta(meta)
        if model.onnx is not None:
            from raydistill.compress import INPUT_NAME, OUTPUT_NAME, onnx_session

            self.platform, self.onnx_names = "onnxruntime_onnx", (INPUT_NAME, OUTPUT_NAME)
            self.session = onnx_session(Path(model.onnx), model.onnx_sha256, threads=threads)
            return
        self.platform, self.session = "pytorch_torchscript", None
        torch.set_num_threads(threads)
        net = load_network(state, meta)  # rebuilds a pruned student's shapes too
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = Classifier(net, self.spec).eval().to(self.device)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.session is not None:
            name_in, name_out = self.onnx_names
            return softmax(self.session.run([name_out], {name_in: pixels})[0])
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(pixels).to(self.device))
            return torch.softmax(logits, dim=-1).float().cpu().numpy()


class RequestPlumbing:
    """What every server's routes share: the API key, the model name and version, bodies read
    under deploy.max_request_bytes, and parsing off the event loop. Needs self.cfg
    (DeployConfig), self.api_key, self.version and self.decoder (a thread pool)."""

    def _authorize(self, request: Request) -> None:
        """With an API key configured, every route but health and docs needs it as a bearer token."""
        if self.api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
            raise BadRequest("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401)

    def _check_model(self, name: str, version: str | None = None) -> None:
        if name != self.cfg.model_name:
            raise BadRequest(f"unknown model '{name}'; this server serves '{self.cfg.model_name}'", status=404)
        if version is not None and version != self.version:
            raise BadRequest(f"model '{name}' has no version '{version}'; serving '{self.version}'", status=404)

    async def _stream(self, request: Request):
        """The body's chunks, counted as they arrive: a chunked body (no Content-Length) is cut
        off at the limit, not read whole first."""
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"request body of {declared} bytes exceeds the limit of {limit} "
                             "(deploy.max_request_bytes)", status=413)
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body exceeds the limit of {limit} bytes (deploy.max_request_bytes)", 413)
            yield chunk

    async def _read_body(self, request: Request) -> bytes:
        return b"".join([chunk async for chunk in self._stream(request)])

    async def _off_loop(self, fn, *args):
        """Run a parse or decode in the bounded pool: the event loop keeps serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    async def _read_json(self, request: Request) -> dict:
        body = await self._read_body(request)
        try:
            payload = await self._off_loop(loads, body, self.cfg.max_json_depth)
        except ProtocolError as err:
            raise BadRequest(str(err), err.status) from None
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        return payload


@serve.deployment
@serve.ingress(api)
class StudentServer(RequestPlumbing):
    """One replica: the student classifier, with requests batched across callers."""

    def __init__(self, model: ServedModel, deploy: dict, version: str):
        self.cfg = DeployConfig.model_validate(deploy)
        self.api_key = read_api_key(self.cfg)
        self.predict_probs = Predictor(model, max(1, int(self.cfg.replica_cpus)), self.cfg.use_gpu)
        self.spec = self.predict_probs.spec
        self.version = version
        self.decoder = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="decode")
        self._forward.set_max_batch_size(self.cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both set from config in __init__
    async def _forward(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Many requests' (B_i, C, H, W) arrays -> forward passes of at most deploy.max_batch_items
        images -> per-request probabilities. (@serve.batch counts requests, not images.)"""
        sizes = [len(r) for r in requests]
        probs = forward_in_chunks(self.predict_probs, np.concatenate(requests), self.cfg.max_batch_items)
        return np.split(probs, np.cumsum(sizes)[:-1])

    async def _read_uploads(self, request: Request) -> np.ndarray:
        """Multipart image files (form field `file`) -> (B, C, H, W): bytes and file count are
        checked while the form streams in, each image's size before it is decoded, in the pool."""
        limit = self.cfg.max_request_images
        try:
            form = await MultiPartParser(request.headers, self._stream(request), max_files=limit, max_fields=limit,
                                         max_part_size=self.cfg.max_request_bytes).parse()
        except MultiPartException as err:
            raise BadRequest(f"multipart body: {err.message}", 413 if "Too many" in err.message else 400) from None
        try:
            files = form.getlist("file")
            if not files or not all(isinstance(f, UploadFile) for f in files):
                raise BadRequest("multipart request needs one or more image files in form field 'file'")
            decoded = await asyncio.gather(*[self._off_loop(decode_upload, await f.read(), self.spec.input_shape,
                                                            self.cfg.max_image_pixels) for f in files],
                                           return_exceptions=True)
        finally:
            await form.close()
        errors = [d for d in decoded if isinstance(d, BaseException)]
        if errors:
            raise errors[0]
        return np.stack(decoded)

    # ---- Open Inference Protocol v2 ------------------------------------------------------

    @api.get("/v2/health/live")
    def live(self) -> dict:
        return {"live": True, "extensions": EXTENSIONS}

    @api.get("/v2/health/ready")
    def ready(self) -> dict:
        return {"ready": True, "extensions": EXTENSIONS}

    @api.get("/v2")
    def server_metadata(self, request: Request) -> dict:
        self._authorize(request)
        return {"name": "raydistill", "version": "2", "extensions": EXTENSIONS}

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name)
        return {
            "name": self.cfg.model_name,
            "versions": [self.version],
            "platform": self.predict_probs.platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *self.spec.input_shape]}],
            "outputs": [
                {"name": PROBS_NAME, "datatype": "FP32", "shape": [-1, self.spec.num_classes]},
                {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]},
            ],
        }

    @api.get("/v2/models/{name}/versions/{version}")
    def model_version_metadata(self, name: str, version: str, request: Request) -> dict:
        self._authorize(request)  # before the version check, which would tell the served version
        self._check_model(name, version)
        return self.model_metadata(name, request)

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/versions/{version}/ready")
    def model_version_ready(self, name: str, version: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name, version)
        return {"name": name, "ready": True}

    @api.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY)
    async def infer(self, name: str, request: Request) -> Response:
        return await self._infer(name, None, request)

    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
    async def infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._infer(name, version, request)

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        self._authorize(request)
        self._check_model(name, version)
        _check_content_type(request, INFER_TYPES)
        body = await self._read_body(request)
        try:
            payload, arrays = await self._off_loop(
                decode_request, body, request.headers.get(HEADER_LENGTH), self.cfg.max_json_depth,
                self.cfg.max_request_images * math.prod(self.spec.input_shape))
            del body  # while the request waits for its forward it holds its array, and no more
            if set(arrays) != {INPUT_NAME}:
                raise ProtocolError(f"expected one input named '{INPUT_NAME}', got {sorted(arrays)}")
            if payload["inputs"][0]["datatype"] != "FP32":
                raise ProtocolError(f"input datatype must be FP32, got {payload['inputs'][0]['datatype']!r}")
            wanted = requested_outputs(payload, [PROBS_NAME, LABEL_NAME])
        except ProtocolError as err:
            raise BadRequest(str(err), err.status) from None
        pixels = check_pixels(arrays.pop(INPUT_NAME), self.spec.input_shape, self.cfg.max_request_images)
        header = {"model_name": self.cfg.model_name, "model_version": self.version}
        if "id" in payload:
            header["id"] = payload["id"]
        del payload
        probs = await self._forward(pixels)
        tensors = {PROBS_NAME: probs.astype(np.float32), LABEL_NAME: probs.argmax(1).astype(np.int64)}
        content, headers = encode_response(header, [(n, tensors[n], binary) for n, binary in wanted])
        return Response(content=content, headers=headers)

    # ---- for people -----------------------------------------------------------------------

    @api.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request) -> dict:
        """Multipart image file(s) in form field `file`, or JSON {"instances": [[pixels on 0..1]]}."""
        self._authorize(request)
        kind = _check_content_type(request, PREDICT_TYPES)
        if kind == "multipart/form-data":
            pixels = await self._read_uploads(request)
        else:
            payload = await self._read_json(request)
            instances = payload.get("instances")
            if not isinstance(instances, list) or not instances:
                raise BadRequest("JSON body needs a non-empty list 'instances' of pixel arrays")
            if len(instances) > self.cfg.max_request_images:
                raise BadRequest(f"{len(instances)} instances exceed the limit of {self.cfg.max_request_images} "
                                 "(deploy.max_request_images)", 413)
            try:
                flat = [np.asarray(i, dtype=np.float32).ravel() for i in instances]
            except (TypeError, ValueError, OverflowError):
                raise BadRequest("each instance must be an array of numbers") from None
            per = int(np.prod(self.spec.input_shape))
            if any(f.size != per for f in flat):
                raise BadRequest(f"each instance must hold {per} pixel values ({'x'.join(map(str, self.spec.input_shape))})")
            pixels = np.stack(flat).reshape(len(flat), *self.spec.input_shape)
        pixels = check_pixels(pixels, self.spec.input_shape, self.cfg.max_request_images)
        return {"model_name": self.cfg.model_name, "model_version": self.version,
                "predictions": top_k(await self._forward(pixels))}


def app(args: dict):
    """The application builder `serve deploy` configs name (`import_path: raydistill.serving:app`,
    as `raydistill deploy` writes it in runs/NAME/deploy/serve_config.yaml):

        args: {weights: .../student.safetensors, sha256: ..., onnx: .../student.int8.onnx,
               onnx_sha256: ..., version: ..., deploy: {...DeployConfig...}}

    (onnx and onnx_sha256 are null when the replicas run the PyTorch student.) The files are
    checked here, before any replica starts: a config that names a missing run or weights
    whose sha256 changed fails to deploy with a message naming the file (`serve status`
    shows it), instead of replicas failing over and over."""
    from raydistill.artifacts import verify_file

    model = ServedModel(args["weights"], args.get("sha256"), args.get("onnx"), args.get("onnx_sha256"),
                        args.get("tokenizer"))
    verify_file(Path(model.weights), model.sha256)
    if model.onnx is not None:
        verify_file(Path(model.onnx), model.onnx_sha256)
    return build_app(model, DeployConfig.model_validate(args.get("deploy", {})), args.get("version", "1"))


def build_app(model: ServedModel, deploy: DeployConfig, version: str):
    """The bound Serve application for a student's files (a text student when it comes with a
    tokenizer)."""
    if model.tokenizer is not None:
        from raydistill.text.serving import build_text_app

        return build_text_app(model, deploy, version)
    return StudentServer.options(**deployment_options(deploy)).bind(model, deploy.model_dump(mode="json"), version)


def deployment_options(deploy: DeployConfig) -> dict:
    """Replica resources, concurrency and scaling, from the deploy section."""
    options = {
        "name": deploy.model_name,
        "ray_actor_options": {"num_cpus": deploy.replica_cpus, "num_gpus": 1 if deploy.use_gpu else 0},
        "max_ongoing_requests": deploy.max_ongoing_requests,
    }
    autoscaling = deploy.autoscaling_config()
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = deploy.num_replicas
    return options
