"""Ray Serve: the student behind the Open Inference Protocol v2 (REST) and a /predict route
for people. Requests are batched across callers with @serve.batch.

Every client mistake is a 4xx whose body says what was wrong: {"error": "..."}.
"""

# No `from __future__ import annotations`: FastAPI must see real types in the replica.

import io
import json
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from raydistill.config import DeployConfig

INPUT_NAME, PROBS_NAME, LABEL_NAME = "pixels", "probabilities", "label"
TOP_K = 3

api = FastAPI(
    title="raydistill",
    description="A distilled image classifier. Open Inference Protocol v2 under /v2; POST /predict for people.",
)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@api.exception_handler(BadRequest)
async def _bad_request(_: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)


def parse_pixels(data, shape, expected: tuple[int, int, int], max_images: int) -> np.ndarray:
    """A v2 tensor (flat or nested data + shape) -> float32 (B, C, H, W) on 0..1, or BadRequest."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest("'shape' must be a list of integers")
    if len(shape) != 4 or tuple(shape[1:]) != expected:
        raise BadRequest(f"input shape {shape} does not match [batch, {', '.join(map(str, expected))}]")
    if shape[0] < 1:
        raise BadRequest("empty batch: the first dimension must be at least 1")
    if shape[0] > max_images:
        raise BadRequest(f"batch of {shape[0]} images exceeds the limit of {max_images}", status=413)
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadRequest("'data' must hold numbers only") from None
    if arr.size != int(np.prod(shape)):
        raise BadRequest(f"'data' holds {arr.size} values; shape {shape} needs {int(np.prod(shape))}")
    arr = arr.reshape(shape)
    if not np.isfinite(arr).all():
        raise BadRequest("'data' holds NaN or infinite values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise BadRequest("pixel values must lie in [0, 1]")
    return arr


def decode_upload(raw: bytes, expected: tuple[int, int, int]) -> np.ndarray:
    """A PNG/JPEG upload -> float32 (C, H, W) on 0..1 at the model's input size."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = expected
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError):
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


@serve.deployment
@serve.ingress(api)
class StudentServer:
    """One replica: the student classifier, with requests batched across callers."""

    def __init__(self, weights: str, sha256: str | None, deploy: dict, version: str):
        import torch

        from raydistill.artifacts import load_weights
        from raydistill.models import Classifier, ModelSpec, build_network

        self.cfg = DeployConfig.model_validate(deploy)
        torch.set_num_threads(max(1, int(self.cfg.replica_cpus)))
        state, meta = load_weights(Path(weights), sha256)
        self.spec = ModelSpec.from_meta(meta)
        net = build_network(self.spec)
        net.load_state_dict(state)
        self.model = Classifier(net, self.spec).eval()
        self.version = version
        self._forward.set_max_batch_size(self.cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _forward(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Many requests' (B_i, C, H, W) arrays -> one forward pass -> per-request probabilities."""
        import torch

        sizes = [len(r) for r in requests]
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.from_numpy(np.concatenate(requests))), dim=-1).numpy()
        return np.split(probs, np.cumsum(sizes)[:-1])

    def _check_model(self, name: str, version: str | None = None) -> None:
        if name != self.cfg.model_name:
            raise BadRequest(f"unknown model '{name}'; this server serves '{self.cfg.model_name}'", status=404)
        if version is not None and version != self.version:
            raise BadRequest(f"model '{name}' has no version '{version}'; serving '{self.version}'", status=404)

    async def _read_json(self, request: Request) -> dict:
        body = await request.body()
        limit = self._max_body_bytes()
        if len(body) > limit:
            raise BadRequest(f"request body of {len(body)} bytes exceeds the limit of {limit}", status=413)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        return payload

    def _max_body_bytes(self) -> int:
        # Generous for JSON text (~20 bytes a number) or encoded images, bounded all the same.
        return max(1 << 20, self.cfg.max_request_images * int(np.prod(self.spec.input_shape)) * 24)

    # ---- Open Inference Protocol v2 ------------------------------------------------------

    @api.get("/v2/health/live")
    def live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready(self) -> dict:
        return {"ready": True}

    @api.get("/v2")
    def server_metadata(self) -> dict:
        return {"name": "raydistill", "version": "2", "extensions": []}

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str) -> dict:
        self._check_model(name)
        return {
            "name": self.cfg.model_name,
            "versions": [self.version],
            "platform": "pytorch_torchscript",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *self.spec.input_shape]}],
            "outputs": [
                {"name": PROBS_NAME, "datatype": "FP32", "shape": [-1, self.spec.num_classes]},
                {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]},
            ],
        }

    @api.get("/v2/models/{name}/versions/{version}")
    def model_version_metadata(self, name: str, version: str) -> dict:
        self._check_model(name, version)
        return self.model_metadata(name)

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str) -> dict:
        self._check_model(name)
        return {"name": name, "ready": True}

    @api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> dict:
        self._check_model(name)
        payload = await self._read_json(request)
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise BadRequest(f"'inputs' must be a list with one tensor named '{INPUT_NAME}'")
        tensor = inputs[0]
        if tensor.get("name") != INPUT_NAME:
            raise BadRequest(f"unknown input '{tensor.get('name')}'; expected '{INPUT_NAME}'")
        if tensor.get("datatype") != "FP32":
            raise BadRequest(f"input datatype must be FP32, got {tensor.get('datatype')!r}")
        if "data" not in tensor:
            raise BadRequest("input has no 'data' (binary tensor data is not supported; send JSON data)")
        pixels = parse_pixels(tensor["data"], tensor.get("shape"), self.spec.input_shape, self.cfg.max_request_images)
        probs = await self._forward(pixels)
        wanted = [o.get("name") for o in payload.get("outputs") or [] if isinstance(o, dict)] or [PROBS_NAME, LABEL_NAME]
        unknown = set(wanted) - {PROBS_NAME, LABEL_NAME}
        if unknown:
            raise BadRequest(f"unknown output(s) {sorted(unknown)}; available: {PROBS_NAME}, {LABEL_NAME}")
        tensors = {
            PROBS_NAME: {"name": PROBS_NAME, "datatype": "FP32", "shape": list(probs.shape),
                         "data": probs.ravel().tolist()},
            LABEL_NAME: {"name": LABEL_NAME, "datatype": "INT64", "shape": [len(probs)],
                         "data": probs.argmax(1).tolist()},
        }
        response = {"model_name": self.cfg.model_name, "model_version": self.version,
                    "outputs": [tensors[n] for n in wanted]}
        if "id" in payload:
            response["id"] = payload["id"]
        return response

    # ---- for people -----------------------------------------------------------------------

    @api.post("/predict")
    async def predict(self, request: Request) -> dict:
        """Multipart image file(s) in form field `file`, or JSON {"instances": [[pixels on 0..1]]}."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            files = form.getlist("file")
            if not files or any(isinstance(f, str) for f in files):
                raise BadRequest("multipart request needs one or more image files in form field 'file'")
            if len(files) > self.cfg.max_request_images:
                raise BadRequest(f"{len(files)} files exceed the limit of {self.cfg.max_request_images}", 413)
            pixels = np.stack([decode_upload(await f.read(), self.spec.input_shape) for f in files])
        else:
            payload = await self._read_json(request)
            instances = payload.get("instances")
            if not isinstance(instances, list) or not instances:
                raise BadRequest("JSON body needs a non-empty list 'instances' of pixel arrays")
            shape = [len(instances), *self.spec.input_shape]
            try:
                flat = [np.asarray(i, dtype=np.float32).ravel() for i in instances]
            except (TypeError, ValueError):
                raise BadRequest("each instance must be an array of numbers") from None
            per = int(np.prod(self.spec.input_shape))
            if any(f.size != per for f in flat):
                raise BadRequest(f"each instance must hold {per} pixel values ({'x'.join(map(str, self.spec.input_shape))})")
            pixels = parse_pixels(np.concatenate(flat), shape, self.spec.input_shape, self.cfg.max_request_images)
        return {"model_name": self.cfg.model_name, "model_version": self.version,
                "predictions": top_k(await self._forward(pixels))}


def build_app(weights: str, sha256: str | None, deploy: DeployConfig, version: str):
    """The bound Serve application for a student's weights."""
    return StudentServer.options(
        name=deploy.model_name,
        num_replicas=deploy.num_replicas,
        ray_actor_options={"num_cpus": deploy.replica_cpus},
        max_ongoing_requests=max(2 * deploy.max_batch_size, 16),
    ).bind(weights, sha256, deploy.model_dump(mode="json"), version)
