"""Open Inference Protocol v2 (KServe / Triton REST) request and response bodies, including
Triton's binary tensor data extension, which stock clients such as tritonclient use by default:
a JSON header of `Inference-Header-Content-Length` bytes, followed by raw little-endian tensors.
"""

import json

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class ProtocolError(ValueError):
    """A malformed request; the message says what was wrong."""


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input '{tensor.get('name')}': 'shape' must be a list of non-negative integers")
    return shape


def decode_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(request JSON, {input name: array}) from a JSON or binary-extension request body."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < split <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {split} does not fit a body of {len(body)} bytes")
        head, blob = body[:split], memoryview(body)[split:]
    else:
        head, blob = body, memoryview(b"")
    try:
        payload = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("request body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ProtocolError("request must be a JSON object with a list 'inputs'")
    arrays, offset = {}, 0
    for tensor in payload["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError("each input must be an object with a 'name'")
        name, datatype = tensor["name"], tensor.get("datatype")
        if datatype not in DTYPES:
            raise ProtocolError(f"input '{name}': unsupported datatype {datatype!r}")
        shape = _shape(tensor)
        count = int(np.prod(shape))
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(blob):
                raise ProtocolError(f"input '{name}': binary_data_size {size!r} does not match shape {shape}")
            arr = np.frombuffer(blob[offset : offset + size], dtype=dtype)
            offset += size
        elif "data" in tensor:
            try:
                arr = np.asarray(tensor["data"], dtype=DTYPES[datatype])
            except (TypeError, ValueError):
                raise ProtocolError(f"input '{name}': 'data' must hold {datatype} numbers only") from None
        else:
            raise ProtocolError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        if arr.size != count:
            raise ProtocolError(f"input '{name}': 'data' holds {arr.size} values; shape {shape} needs {count}")
        arrays[name] = arr.reshape(shape)
    if offset != len(blob):
        raise ProtocolError(f"{len(blob) - offset} bytes of binary data follow the inputs unclaimed")
    return payload, arrays


def requested_outputs(payload: dict, available: list[str]) -> list[tuple[str, bool]]:
    """[(output name, send as binary)] in request order (all outputs when none are named)."""
    binary_default = bool((payload.get("parameters") or {}).get("binary_data_output", False))
    asked = payload.get("outputs")
    if not asked:
        return [(name, binary_default) for name in available]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    unknown = sorted({o.get("name") for o in asked} - set(available), key=str)
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; available: {', '.join(available)}")
    return [(o["name"], bool((o.get("parameters") or {}).get("binary_data", binary_default))) for o in asked]


def _datatype(arr: np.ndarray) -> str:
    return next(name for name, dtype in DTYPES.items() if np.dtype(dtype) == arr.dtype)


def encode_response(header: dict, outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers): JSON alone, or JSON header + binary tensors when any are binary."""
    tensors, blobs = [], []
    for name, arr, binary in outputs:
        tensor = {"name": name, "datatype": _datatype(arr), "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = arr.ravel().tolist()
        tensors.append(tensor)
    head = json.dumps({**header, "outputs": tensors}).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
