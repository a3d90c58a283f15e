"""Open Inference Protocol v2 (KServe / Triton REST) request and response bodies, including
Triton's binary tensor data extension, which stock clients such as tritonclient use by default:
a JSON header of `Inference-Header-Content-Length` bytes, followed by raw little-endian tensors.
"""

import json
import math
import re

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]  # what /v2 and health report, as KServe and Triton do
MAX_DIMS = 16  # far past any image batch; numpy's own limit (64) fails with an error of its own
DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


# The fields the protocol defines: anything else is refused rather than held in memory unread.
REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
OUTPUT_FIELDS = {"name", "parameters"}
MAX_PARAMETERS = 64
# Bytes of Python objects json.loads makes of one byte of JSON text, at worst: 27 for
# `{"":0},` (a dict each), 21 for `[],`, 8 for `1e0,` (a float each). Parsing runs in the
# replica's decode threads, so this times max_request_bytes per thread bounds it.
JSON_EXPANSION = 32


class ProtocolError(ValueError):
    """A malformed request (status 400), or one past a size limit (413); the message says what
    was wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# A JSON string literal (possessive: linear time on any input), and the bytes that are not brackets.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(body: bytes) -> int:
    """How deeply UTF-8 JSON text nests arrays and objects, measured without parsing it, so that
    a 200k-deep body is refused before the recursive decoder sees it. (In UTF-8 the bytes of
    '"', '\\' and brackets never occur inside another character.)"""
    brackets = np.frombuffer(_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max())


def loads(body: bytes, max_depth: int):
    """json.loads of a UTF-8 body (RFC 8259), refusing text that nests deeper than `max_depth`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request body is not UTF-8 JSON") from None
    depth = json_depth(body)
    if depth > max_depth:
        raise ProtocolError(f"request JSON nests {depth} levels deep, past the limit of {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # ValueError: JSONDecodeError, or an int of > 4300 digits
        raise ProtocolError("request body is not valid JSON") from None


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object, got {type(params).__name__}")
    if len(params) > MAX_PARAMETERS:
        raise ProtocolError(f"{where}: {len(params)} parameters; at most {MAX_PARAMETERS} are accepted")
    if not all(v is None or isinstance(v, str | int | float | bool) for v in params.values()):
        raise ProtocolError(f"{where}: parameter values must be strings, numbers or booleans")
    return params


def _only(obj: dict, fields: set[str], where: str) -> None:
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {unknown}; the protocol defines {sorted(fields)}")


def _shape(tensor: dict, max_values: int) -> tuple[list[int], int]:
    """The tensor's shape and element count, checked before anything is allocated."""
    name, shape = tensor.get("name"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input '{name}': 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"input '{name}': {len(shape)} dimensions; at most {MAX_DIMS} are accepted")
    count = math.prod(shape)  # Python ints: a product past 2**63 cannot wrap around
    if max(shape, default=0) > max_values:  # [0, 10**30] holds no value, yet no array can have it
        raise ProtocolError(f"input '{name}': dimension {max(shape)} of shape {shape} exceeds the limit of "
                            f"{max_values} values a request may carry", status=413)
    if count > max_values:
        raise ProtocolError(f"input '{name}': shape {shape} holds {count} values, which exceeds the limit of "
                            f"{max_values} a request may carry", status=413)
    return shape, count


def decode_request(body: bytes, header_length: str | None, max_depth: int = 32,
                   max_values: int = 1 << 26) -> tuple[dict, dict[str, np.ndarray]]:
    """(request JSON without its inputs' data, {input name: array}) from a JSON or
    binary-extension request body. `max_depth` bounds the JSON nesting, `max_values` the
    elements of any one input; fields the protocol does not define are refused."""
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
    payload = loads(head, max_depth)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ProtocolError("request must be a JSON object with a list 'inputs'")
    _only(payload, REQUEST_FIELDS, "request")
    if "id" in payload and not isinstance(payload["id"], str):
        raise ProtocolError("request 'id' must be a string")
    _parameters(payload, "request")
    for output in payload.get("outputs") or []:
        if isinstance(output, dict):
            _only(output, OUTPUT_FIELDS, "output")
    arrays, offset = {}, 0
    for tensor in payload["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError("each input must be an object with a 'name'")
        name, datatype = tensor["name"], tensor.get("datatype")
        _only(tensor, INPUT_FIELDS, f"input '{name}'")
        if name in arrays:
            raise ProtocolError(f"input '{name}' is given more than once")
        if not isinstance(datatype, str) or (datatype not in DTYPES and datatype != "BYTES"):
            raise ProtocolError(f"input '{name}': unsupported datatype {datatype!r}")
        shape, count = _shape(tensor, max_values)
        size = _parameters(tensor, f"input '{name}'").get("binary_data_size")
        if datatype == "BYTES":
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(blob):
                    raise ProtocolError(f"input '{name}': binary_data_size {size!r} does not fit the body")
                arr = _bytes_elements(blob[offset : offset + size], name)
                offset += size
            elif "data" in tensor:
                arr = _strings(tensor["data"], name)
            else:
                raise ProtocolError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        elif size is not None:
            dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(blob):
                raise ProtocolError(f"input '{name}': binary_data_size {size!r} does not match shape {shape}")
            arr = np.frombuffer(blob[offset : offset + size], dtype=dtype)
            offset += size
        elif "data" in tensor:
            try:
                arr = np.asarray(tensor["data"], dtype=DTYPES[datatype])
            except OverflowError:  # UINT8 of -1, INT64 of 2**70
                raise ProtocolError(f"input '{name}': 'data' holds a value out of {datatype}'s range") from None
            except (TypeError, ValueError):
                raise ProtocolError(f"input '{name}': 'data' must hold {datatype} numbers only") from None
        else:
            raise ProtocolError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        if arr.size != count:
            raise ProtocolError(f"input '{name}': 'data' holds {arr.size} values; shape {shape} needs {count}")
        arrays[name] = arr.reshape(shape)
        tensor.pop("data", None)  # the parsed lists cost ~8x their text: only the array is kept
    if offset != len(blob):
        raise ProtocolError(f"{len(blob) - offset} bytes of binary data follow the inputs unclaimed")
    return payload, arrays


def _bytes_elements(raw: memoryview, name: str) -> np.ndarray:
    """Triton's binary BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        length = int.from_bytes(raw[at : at + 4], "little")
        if at + 4 + length > len(raw):
            raise ProtocolError(f"input '{name}': a BYTES element of {length} bytes runs past its data")
        out.append(_utf8(bytes(raw[at + 4 : at + 4 + length]), name))
        at += 4 + length
    return np.array(out, dtype=object)


def _utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"input '{name}': a BYTES element is not UTF-8 text") from None


def _strings(data, name: str) -> np.ndarray:
    """JSON BYTES data: strings, in lists nested as the shape says (tritonclient flattens them)."""
    flat, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise ProtocolError(f"input '{name}': BYTES 'data' must hold strings, got {type(item).__name__}")
    return np.array(flat, dtype=object)


def requested_outputs(payload: dict, available: list[str]) -> list[tuple[str, bool]]:
    """[(output name, send as binary)] in request order (all outputs when none are named)."""
    binary_default = bool(_parameters(payload, "request").get("binary_data_output", False))
    asked = payload.get("outputs")
    if not asked:
        return [(name, binary_default) for name in available]
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise ProtocolError("'outputs' must be a list of objects, each with a string 'name'")
    unknown = sorted({o["name"] for o in asked} - set(available))
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; available: {', '.join(available)}")
    return [(o["name"], bool(_parameters(o, f"output '{o['name']}'").get("binary_data", binary_default)))
            for o in asked]


def _datatype(arr: np.ndarray) -> str:
    if arr.dtype == object:  # strings
        return "BYTES"
    return next(name for name, dtype in DTYPES.items() if np.dtype(dtype) == arr.dtype)


def _binary(arr: np.ndarray) -> bytes:
    """A tensor's binary-extension bytes: little-endian values, or for BYTES each element's
    UTF-8 bytes after its 4-byte little-endian length (as tritonclient reads them)."""
    if arr.dtype != object:
        return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    parts = [str(item).encode("utf-8", "surrogatepass") for item in arr.ravel()]
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def encode_response(header: dict, outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers): JSON alone, or JSON header + binary tensors when any are binary."""
    tensors, blobs = [], []
    for name, arr, binary in outputs:
        tensor = {"name": name, "datatype": _datatype(arr), "shape": list(arr.shape)}
        if binary:
            raw = _binary(arr)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = arr.ravel().tolist()
        tensors.append(tensor)
    head = json.dumps({**header, "outputs": tensors}).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
