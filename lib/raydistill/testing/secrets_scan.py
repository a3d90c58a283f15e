"""Find key-like strings in files: the repository must hold no credentials (tests scan every
tracked file with this; run it before a commit with `python -m raydistill.testing.secrets_scan`).

Patterns follow the common secret scanners' high-confidence rules: cloud access keys,
private key blocks, provider tokens, and assignments of long random-looking literals to names
like token/secret/password/api_key. Placeholders (YOUR-..., FILL-..., REGISTRY/...) do not match.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{32,}\b"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "secret assignment": re.compile(
        r"""(?i)\b[\w-]*(?:token|secret|passw(?:or)?d|api[_-]?key|access[_-]?key)[\w-]*\b["']?\s*[:=]\s*"""
        r"""["']?(?=[A-Za-z0-9+/_=-]*\d)(?=[A-Za-z0-9+/_=-]*[A-Za-z])[A-Za-z0-9+/_=-]{24,}["']?"""
    ),
}
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".safetensors", ".onnx", ".parquet", ".zip", ".gz"}


def scan_text(text: str) -> list[tuple[int, str]]:
    """(line number, rule) for every key-like string in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for rule, pattern in PATTERNS.items():
            if pattern.search(line):
                found.append((number, rule))
    return found


def tracked_files(repo: Path) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True, check=True)
    return [repo / p for p in out.stdout.split("\0") if p]


def scan_repo(repo: Path) -> list[str]:
    """'path:line: rule' for every finding in the repository's tracked files."""
    findings = []
    for path in tracked_files(repo):
        if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        findings += [f"{path.relative_to(repo)}:{n}: {rule}" for n, rule in scan_text(text)]
    return findings


if __name__ == "__main__":
    hits = scan_repo(Path.cwd())
    print("\n".join(hits) or "no key-like strings in tracked files")
    sys.exit(1 if hits else 0)
