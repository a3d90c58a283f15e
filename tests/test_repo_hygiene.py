"""Fast checks on the tree itself: the repository speaks of the product only, and every test and
benchmark starts a Ray of its own instead of joining whatever cluster runs on the machine."""

from __future__ import annotations

import ast
import re
import subprocess

import pytest

from conftest import REPO

# Words about how the work was organised, not about the product. Built from parts so that this
# file does not match itself.
_PROCESS_WORDS = re.compile("|".join([
    r"\b(this|last|next|previous) " + "stop" + r"\b",
    r"\b" + "stop" + r"s? [0-9]+\b",
    r"\b" + "issue" + r" ?#?[0-9]+[a-z]?\b",
    r"\b" + "issue" + r"[0-9]+[a-z]*\b",
    r"\b" + "session" + r"s? [0-9]+\b",
    "/tmp/" + r"d[0-9]+\b",
]), re.IGNORECASE)


def _tracked_text_files() -> list:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = []
    for name in names.splitlines():
        path = REPO / name
        try:
            files.append((name, path.read_text()))
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary (PNG), or deleted in the working tree
    return files


def test_no_development_process_words_in_tracked_files():
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for name, text in _tracked_text_files() for m in _PROCESS_WORDS.finditer(text)]
    assert not hits, "words about how the work was organised:\n" + "\n".join(hits)


@pytest.mark.parametrize("text", ["as measured this st" + "op", "since st" + "op 17", "see iss" + "ue 6",
                                  "branch iss" + "ue6c", "/tmp/" + "d17/probe.py", "in sess" + "ion 3"])
def test_the_process_word_check_catches(text):
    assert _PROCESS_WORDS.search(text)


@pytest.mark.parametrize("text", ["Ctrl-C to stop", "stop the head", "a stopped job", "ray job stop",
                                  "GitHub issues", "a session token", "the stops list"])
def test_the_process_word_check_leaves_product_words_alone(text):
    assert not _PROCESS_WORDS.search(text)


def _ray_init_calls(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
            yield node


def test_tests_and_benchmarks_start_their_own_ray():
    """`ray.init(num_cpus=2)` without an address joins the last cluster started on the machine
    (even a dead one) and fails there; `address="local"` always starts a new one."""
    offenders = []
    for path in sorted([*REPO.glob("tests/*.py"), *REPO.glob("bench/*.py")]):
        for call in _ray_init_calls(path):
            address = next((k.value for k in call.keywords if k.arg == "address"), None)
            if not (isinstance(address, ast.Constant) and address.value == "local"):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not offenders, f"ray.init without address='local': {offenders}"
