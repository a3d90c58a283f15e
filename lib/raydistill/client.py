"""`raydistill query`: send images or texts to a deployment, print predictions as a table, or
a question and its context to a question answering deployment, print the answer."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CHUNK = 64  # files per request
KEY_ENV = "RAYDISTILL_API_KEY"


def api_key(key_file: str | None = None) -> str | None:
    """The key to send: from `key_file` when given, else from $RAYDISTILL_API_KEY, else none."""
    if key_file:
        try:
            key = Path(key_file).expanduser().read_text().strip()
        except OSError as err:
            raise ValueError(f"--api-key-file: cannot read {key_file} ({err.strerror})") from None
        if not key:
            raise ValueError(f"--api-key-file: {key_file} is empty")
        return key
    return os.environ.get(KEY_ENV, "").strip() or None


def _image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{raw}: no such file or folder")
    if not files:
        raise ValueError(f"no PNG/JPEG images under {', '.join(paths)}")
    return files


def _predict(url: str, key: str | None, **body) -> list[dict]:
    """POST to /predict; the predictions, or an error naming what the deployment said."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = requests.post(f"{url.rstrip('/')}/predict", headers=headers, timeout=60, **body)
    except requests.ConnectionError:
        raise RuntimeError(f"cannot reach {url}: is the deployment running?") from None
    if resp.status_code != 200:
        try:
            message = resp.json().get("error", resp.text)
        except ValueError:
            message = resp.text
        hint = f" (send the key with --api-key-file or ${KEY_ENV})" if resp.status_code == 401 and not key else ""
        raise RuntimeError(f"{url}/predict answered {resp.status_code}: {message}{hint}")
    return resp.json()["predictions"]


def ask(url: str, question: str, context: str, key_file: str | None = None) -> int:
    """POST one question and its context to /predict; print the answer span and its score."""
    (pred,) = _predict(url, api_key(key_file), json={"instances": [{"question": question, "context": context}]})
    answer = pred["answer"] or "(no answer)"
    print(f"answer: {answer}\nspan:   characters {pred['start']}..{pred['end']} of the context\nscore:  {pred['score']:.3f}")
    return 0


def query(url: str, paths: list[str], key_file: str | None = None, texts: list[str] | None = None) -> int:
    """POST images (or, for a text model, texts) to /predict and print one row per input."""
    key = api_key(key_file)
    rows = []
    if texts:
        for i in range(0, len(texts), CHUNK):
            chunk = texts[i : i + CHUNK]
            rows += zip(chunk, _predict(url, key, json={"instances": [{"text": t} for t in chunk]}))
        shown = [(t if len(t) <= 60 else t[:57] + "...", p) for t, p in rows]
    else:
        files = _image_files(paths)
        for i in range(0, len(files), CHUNK):
            chunk = files[i : i + CHUNK]
            rows += zip(chunk, _predict(url, key, files=[("file", (p.name, p.read_bytes())) for p in chunk]))
        shown = [(str(p), pred) for p, pred in rows]
    width = max(len(name) for name, _ in shown)
    print(f"{'text' if texts else 'image':<{width}}  label  prob    top-3")
    for name, pred in shown:
        label = pred.get("class_name", pred["label"])
        top = ", ".join(f"{t.get('class_name', t['label'])}:{t['probability']:.2f}" for t in pred["top_k"])
        print(f"{name:<{width}}  {label!s:>5}  {pred['probability']:.3f}  {top}")
    return 0
