"""The run directory: one folder per stage, summaries, weights, and manifest.json.

Every output is recorded with its sha256, so a rerun can skip a finished stage only when its
outputs are still exactly what that stage wrote. Weights are safetensors only; nothing is ever
loaded with pickle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

STAGES = ("data", "sweep", "teacher", "student", "deploy")
_TRACKED_PACKAGES = ("raydistill", "ray", "torch", "torchvision", "deepspeed", "timm", "kornia", "optuna")


class ArtifactError(RuntimeError):
    """A stored artifact is missing, changed or unreadable, or cannot be written."""


class RunLocked(ArtifactError):
    """Another command is writing the same run."""


# Errors that mean "the storage is full", whatever the file: said plainly, not as a traceback.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` into a temp file of its own beside `path` (a unique name, so two writers
    never share one), fsync it, rename it over `path`, fsync the folder. A reader sees the old
    file or the new one, never half of one; a crash at any point (SIGKILL, power loss) leaves
    at most a `.NAME.*.tmp` beside it. A full disk is an ArtifactError that says so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _errno(err) in _NO_SPACE:
            raise ArtifactError(f"{path}: cannot write it ({os.strerror(_errno(err))}): free space on {path.parent} "
                                "(or raise the file-size limit) and rerun; the files written before are intact") from None
        raise
    return path


def publish(staging: Path, dest: Path, files: list[Path]) -> list[Path]:
    """Move files a stage wrote under `staging` to the same relative paths under `dest`, only
    once all of them exist: until then the stage's last good outputs in `dest` stay as they
    were. Each move is a rename (atomic); the folders are fsynced. Returns the new paths."""
    moved = []
    for path in files:
        target = dest / Path(path).relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    for folder in {m.parent for m in moved}:
        _fsync(folder)
    return moved


def _errno(err: BaseException) -> int | None:
    """The OS error behind a failed write: an OSError's, or the one safetensors' Rust writer
    puts in its message ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return int(found.group(1)) if found else None


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


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


def _lock_holder(fd: int) -> dict:
    """Who wrote the lock file last (empty when it was released cleanly or never held)."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


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

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for this command: one writer per run name. A second one gets RunLocked
        naming the holder. The lock is the kernel's (flock on `.lock`; NFSv4 carries it too), so
        a holder that dies, even by SIGKILL, releases it; the next writer takes it over and
        says so."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                raise RunLocked(f"run '{self.name}' is in use by pid {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')}, started {holder.get('started', '?')}; wait for it, "
                                "or use another --name") from None
            left = _lock_holder(fd)
            if left:
                print(f"[raydistill] run '{self.name}': taking over the lock left by pid {left.get('pid')} on "
                      f"{left.get('host')} (started {left.get('started')}), which has ended", flush=True)
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # an empty file: released cleanly
        finally:
            os.close(fd)  # releases the flock

    def start(self, config: dict, config_hash: str) -> None:
        """Record the resolved config of this invocation; each stage keeps its own beside its
        record (Run.stage), so a later `deploy --set ...` does not rewrite how the teacher was
        trained."""
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

    def good_outputs(self, stage: str) -> dict[str, str]:
        """{relative path: sha256} of the stage's last successful run: its current record when
        that is done, else the one kept while a newer attempt runs or after it failed."""
        record = self.manifest().get("stages", {}).get(stage, {})
        good = record if record.get("status") == "done" else record.get("last_good") or {}
        return good.get("outputs", {})

    def output_hash(self, stage: str, rel: str) -> str | None:
        return self.good_outputs(stage).get(rel)

    def _update_stage(self, stage: str, **fields) -> None:
        manifest = self.manifest()
        manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        write_json(self.manifest_path, manifest)

    @contextlib.contextmanager
    def stage(self, stage: str, config_hash: str, inputs: list[Path] = (),
              config: dict | None = None) -> Iterator[list[Path]]:
        """Run one stage: yields a list the stage appends its output paths to. The record keeps
        the config sections the stage read and the code's git sha."""
        outputs: list[Path] = []
        before = self.manifest().get("stages", {}).get(stage, {})
        # Until this attempt succeeds, later stages keep using the last good outputs (each still
        # checked by hash: one this attempt has overwritten is refused, never mixed in).
        last_good = ({k: before[k] for k in ("config_hash", "outputs", "start", "end") if k in before}
                     if before.get("status") == "done" else before.get("last_good"))
        self._update_stage(
            stage, status="running", last_good=last_good, config_hash=config_hash, config=config, git_sha=_git_sha(),
            start=time.time(), end=None, error=None,
            inputs={self._rel(p): sha256(p) for p in inputs if Path(p).is_file()}, outputs={},
        )
        try:
            yield outputs
            written = {self._rel(p): sha256(p) for p in outputs}  # a missing output fails the stage
        except BaseException as err:
            # Ctrl-C, or SIGTERM (`ray job stop`, Kubernetes): after ray.init, Ray's own SIGTERM
            # handler raises SystemExit; before it, the CLI's raises KeyboardInterrupt.
            status = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
            try:
                self._update_stage(stage, status=status, end=time.time(), error=str(err)[:500])
            except ArtifactError:  # the disk is full: the manifest keeps its last good state
                pass
            raise
        self._update_stage(stage, status="done", end=time.time(), last_good=None, outputs=written)

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
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


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


def read_meta(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata alone (what the model is), without its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(verify_file(path)), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from None
