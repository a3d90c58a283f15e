"""The run directory: one folder per stage, summaries, weights, and manifest.json.

Every output is recorded with its sha256, so a rerun can skip a finished stage only when its
outputs are still exactly what that stage wrote. Weights are safetensors only; nothing is ever
loaded with pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

STAGES = ("data", "sweep", "teacher", "student", "deploy")
_TRACKED_PACKAGES = ("raydistill", "ray", "torch", "torchvision", "deepspeed", "timm", "kornia", "optuna")


class ArtifactError(RuntimeError):
    """A stored artifact is missing, changed or unreadable."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj) -> Path:
    """Atomic write: a crash never leaves half a summary behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    found = {}
    for name in _TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


class Run:
    """`STORAGE/NAME/`: stage folders plus manifest.json."""

    def __init__(self, storage: str | Path, name: str):
        self.root = Path(storage).expanduser().resolve() / name
        self.name = name
        self.manifest_path = self.root / "manifest.json"

    def dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"name": self.name, "stages": {}}
        return read_json(self.manifest_path)

    def start(self, config: dict, config_hash: str) -> None:
        """Record the resolved config of this invocation (each stage also keeps its own hash)."""
        manifest = self.manifest()
        manifest.update(
            name=self.name, config=config, config_hash=config_hash, git_sha=_git_sha(),
            packages=_versions(),
        )
        manifest.setdefault("stages", {})
        write_json(self.manifest_path, manifest)

    def is_done(self, stage: str, config_hash: str) -> bool:
        """Finished earlier with the same config, and its inputs and outputs are unchanged."""
        record = self.manifest().get("stages", {}).get(stage)
        if not record or record.get("status") != "done" or record.get("config_hash") != config_hash:
            return False
        for rel, digest in {**record.get("inputs", {}), **record.get("outputs", {})}.items():
            path = self.root / rel
            if not path.exists() or sha256(path) != digest:
                return False
        return True

    def output_hash(self, stage: str, rel: str) -> str | None:
        return self.manifest().get("stages", {}).get(stage, {}).get("outputs", {}).get(rel)

    def _update_stage(self, stage: str, **fields) -> None:
        manifest = self.manifest()
        manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        write_json(self.manifest_path, manifest)

    @contextlib.contextmanager
    def stage(self, stage: str, config_hash: str, inputs: list[Path] = ()) -> Iterator[list[Path]]:
        """Run one stage: yields a list the stage appends its output paths to."""
        outputs: list[Path] = []
        self._update_stage(
            stage, status="running", config_hash=config_hash, start=time.time(), end=None, error=None,
            inputs={self._rel(p): sha256(p) for p in inputs if Path(p).is_file()}, outputs={},
        )
        try:
            yield outputs
        except BaseException as err:
            # Ctrl-C, or SIGTERM (`ray job stop`, Kubernetes): after ray.init, Ray's own SIGTERM
            # handler raises SystemExit; before it, the CLI's raises KeyboardInterrupt.
            status = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
            self._update_stage(stage, status=status, end=time.time(), error=str(err)[:500])
            raise
        self._update_stage(
            stage, status="done", end=time.time(),
            outputs={self._rel(p): sha256(p) for p in outputs},
        )

    def _rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


# ---- weights ---------------------------------------------------------------------------


def save_weights(path: Path, state_dict: dict, meta: dict[str, str]) -> Path:
    """Contiguous CPU tensors as safetensors, with the model spec in the header metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def verify_file(path: Path, expected_sha256: str | None = None) -> Path:
    """The path, once it exists and (when a hash is given) matches the sha256 recorded for it.
    A truncated file, or one with a single changed byte, is refused before anything parses it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    if expected_sha256 and sha256(path) != expected_sha256:
        raise ArtifactError(
            f"{path}: sha256 differs from the one recorded in manifest.json (file changed or truncated)"
        )
    return path


def load_weights(path: Path, expected_sha256: str | None = None) -> tuple[dict, dict[str, str]]:
    """(state_dict, metadata). Refuses a file whose hash differs from the one recorded."""
    from safetensors import SafetensorError, safe_open

    path = verify_file(path, expected_sha256)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, meta
