"""What the data at a source looks like now, in one hash: changed data at the same path must
not silently reuse models trained on the old data.

`sample` (the default) hashes every file's path, size and modification time, plus the first
and last 64 KiB of up to 256 files spread evenly over the sorted listing: cheap on a million
files or on object storage, and it catches appended, truncated, replaced or touched files.
`full` hashes every byte: it also catches an edit inside a large file that keeps its size
and modification time, at the cost of reading the whole data set once per command.
"""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs

EDGE_BYTES = 64 * 1024
SAMPLED_FILES = 256


def _files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in found if i.type == pafs.FileType.File and not i.base_name.startswith(".")),
                  key=lambda i: i.path)


def _content(fs: pafs.FileSystem, info: pafs.FileInfo, full: bool, digest) -> None:
    with fs.open_input_file(info.path) as f:
        if full or info.size <= 2 * EDGE_BYTES:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(f.read_at(EDGE_BYTES, 0))
            digest.update(f.read_at(EDGE_BYTES, info.size - EDGE_BYTES))


def fingerprint(source: str, full: bool = False) -> dict:
    """{"mode", "files", "bytes", "newest_mtime", "sha256"} of a local path or pyarrow URI
    (found as the data stage finds it: data.locate, whose errors name the source). Paths are
    hashed relative to the source, so moving the whole folder changes nothing."""
    from raydistill.data import locate

    fs, path, _ = locate(source)
    files = _files(fs, path)
    digest = hashlib.sha256()
    for info in files:
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        relative = info.path[len(path):].lstrip("/") or info.base_name
        digest.update(f"{relative}\0{info.size}\0{mtime}\n".encode())
    step = 1 if full else max(1, len(files) // SAMPLED_FILES)
    for info in files[::step]:
        _content(fs, info, full, digest)
    newest = max((i.mtime for i in files if i.mtime is not None), default=None)
    return {"mode": "full" if full else "sample", "files": len(files), "bytes": sum(i.size for i in files),
            "newest_mtime": newest.isoformat() if newest else None, "sha256": digest.hexdigest()}
