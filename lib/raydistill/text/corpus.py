"""The bundled text sets, read from the installed libraries' docstrings: which library a
docstring comes from (text classification), and questions on the parameters that numpydoc
docstrings document (extractive question answering).

A real, offline, non-trivial text classification set that exists on any machine with the
venv: the first paragraph of each public docstring in eight of the installed libraries,
labelled by library. The texts are technical English written by many authors; the classes
overlap (numpy, scipy and torch all document arrays; pydantic and ray both validate and
configure), so word counting alone does not solve it. Library names and their usual import
aliases are removed, so no text names its own label. The pinned constraints fix the library
versions, so the set is the same on every machine.

Read from source with `ast` (no library is imported), deduplicated by text (a re-exported
object is documented once), capped per class so that no class dominates, and ordered by a
hash of the text so that a file cut anywhere still holds every class.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import re
from pathlib import Path

# (label name, import name): libraries whose docs cover distinct but overlapping ground.
LIBRARIES = (("numpy", "numpy"), ("scipy", "scipy"), ("scikit-learn", "sklearn"), ("torch", "torch"),
             ("pyarrow", "pyarrow"), ("pydantic", "pydantic"), ("pillow", "PIL"), ("ray", "ray"))
PER_CLASS = 300
SCAN_LIMIT = 8 * PER_CLASS  # texts read per library, in path order
UNLABELLED_PER_LIBRARY = 1500
MIN_WORDS, MAX_CHARS = 8, 600
# Words that give the label away: names of the libraries and their import aliases.
GIVEAWAYS = re.compile(
    r"\b(numpy|np|scipy|sp|sklearn|scikit-learn|scikit|torch|pytorch|tensorflow|pyarrow|pa|arrow|pydantic|"
    r"pil|pillow|image|ray|ndarray|tensor|tensors)\b", re.IGNORECASE)


def _first_paragraph(doc: str) -> str | None:
    para = doc.strip().split("\n\n", 1)[0]
    text = GIVEAWAYS.sub("", " ".join(para.split()))
    text = re.sub(r"\s+([.,;:)])", r"\1", " ".join(text.split()))
    if len(text.split()) < MIN_WORDS or text.startswith((">>>", "..", "|", "-")):
        return None
    return text[:MAX_CHARS]


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = getattr(node, "name", "")
            if name.startswith("_") and name != "__init__":
                continue
            doc = ast.get_docstring(node)
            if doc:
                yield doc


@functools.lru_cache(maxsize=None)
def _library_files(module: str) -> tuple[tuple[str, ...], ...]:
    """The first paragraphs of each of a library's source files, in path order (read once per
    process: the labelled and the unlabelled set both come from them)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the bundled text set needs {module}, which is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = []  # private modules too: scipy and numpy define their public API in _-prefixed files
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not any(p in ("tests", "test", "testing", "_vendor", "vendored", "thirdparty") for p in parts):
            files.append(tuple(t for doc in _docstrings(path) if (t := _first_paragraph(doc))))
    return tuple(files)


def _library_texts(module: str, limit: int | None = SCAN_LIMIT) -> list[str]:
    """A library's first paragraphs, file by file until `limit` (None: all of them)."""
    texts = []
    for file_texts in _library_files(module):
        texts.extend(file_texts)
        if limit is not None and len(texts) >= limit:  # plenty to pick PER_CLASS from
            break
    return texts


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def docstring_rows(per_class: int = PER_CLASS) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, class names). A text found in two libraries is dropped from both."""
    by_library = {name: set(_library_texts(module)) for name, module in LIBRARIES}
    seen: dict[str, int] = {}
    for texts in by_library.values():
        for t in texts:
            seen[t] = seen.get(t, 0) + 1
    rows = []
    for label, (name, _) in enumerate(LIBRARIES):
        unique = sorted((t for t in by_library[name] if seen[t] == 1), key=_key)[:per_class]
        rows.extend((t, label) for t in unique)
    rows.sort(key=lambda row: _key(row[0]))
    return [t for t, _ in rows], [label for _, label in rows], [name for name, _ in LIBRARIES]


def unlabelled_docstrings(per_library: int = UNLABELLED_PER_LIBRARY) -> list[str]:
    """First paragraphs of the same libraries that the labelled set does not hold, up to
    `per_library` of each (ordered by a hash): texts without labels for the student to distil on."""
    labelled = set(docstring_rows()[0])
    texts = []
    for _, module in LIBRARIES:
        rest = sorted(set(_library_texts(module, limit=None)) - labelled, key=_key)
        texts.extend(rest[:per_library])
    return sorted(set(texts), key=_key)


def write_unlabelled_parquet(path: Path, per_library: int = UNLABELLED_PER_LIBRARY) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": unlabelled_docstrings(per_library)}), path, row_group_size=1024)
    return path


def write_docstrings_parquet(path: Path, per_class: int = PER_CLASS) -> Path:
    """The bundled set as Parquet (text, label), with the class names in the schema metadata."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels, names = docstring_rows(per_class)
    table = pa.table({"text": texts, "label": pa.array(labels, pa.int64())})
    table = table.replace_schema_metadata({"class_names": json.dumps(names)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=512)
    return path


# ---- question answering: the parameters numpydoc docstrings document -----------------------

QA_LIBRARIES = ("numpy", "scipy", "sklearn")  # numpydoc style: "Parameters" underlined, "name : type"
QA_EXAMPLES = 2400
MAX_CONTEXT_CHARS = 320
_ENTRY = re.compile(r"^(\w+) : (.+)$")
_MARKUP = re.compile(r"[`*]|:\w+:")


def _parameter_sections(doc: str):
    """The entries [(name, type, first sentence)] of each Parameters section of a numpydoc docstring."""
    lines = doc.expandtabs().splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() != "Parameters" or set(lines[i + 1].strip()) != {"-"}:
            continue
        entries, base = [], None
        for body in lines[i + 2:]:
            if body.strip() and set(body.strip()) == {"-"}:  # the next section's underline
                entries = entries[:-1] if entries and not entries[-1][2] else entries
                break
            if not body.strip():
                continue
            indent = len(body) - len(body.lstrip())
            base = indent if base is None else base
            match = _ENTRY.match(body.strip())
            if indent == base:
                if not match:
                    break
                entries.append([match.group(1), " ".join(_MARKUP.sub("", match.group(2)).split()), ""])
            elif entries and not entries[-1][2].endswith("."):
                entries[-1][2] = " ".join(f"{entries[-1][2]} {_MARKUP.sub('', body.strip())}".split())
        yield [(n, t, d.split(". ")[0].rstrip(".")) for n, t, d in entries if d]


def _qa_rows_of(entries: list[tuple], key: str) -> list[dict]:
    """Two questions on one Parameters section: which parameter a description describes (the
    answer is its name) and what type a parameter takes (the answer is the type)."""
    context, where = "", []
    for name, kind, desc in entries:
        entry = f"{name} ({kind}): {desc}. "
        if len(context) + len(entry) > MAX_CONTEXT_CHARS:
            break
        where.append((len(context), len(context) + len(name) + 2, name, kind, desc))
        context += entry
    if len(where) < 2:
        return []
    h = int(_key(key), 16)
    name_at, type_at, name, kind, desc = where[h % len(where)]
    other = where[(h // 7) % len(where)]
    return [
        {"id": f"{_key(key)[:12]}-name", "question": f"Which parameter: {desc[0].lower() + desc[1:]}?",
         "context": context.strip(), "answers": [{"text": name, "answer_start": name_at}]},
        {"id": f"{_key(key)[:12]}-type", "question": f"What type is {other[2]}?", "context": context.strip(),
         "answers": [{"text": other[3], "answer_start": other[1]}]},
    ]


def parameter_questions(limit: int = QA_EXAMPLES) -> list[dict]:
    """SQuAD-style rows (id, question, context, answers): contexts are the Parameters sections
    of numpy, scipy and scikit-learn docstrings (name, type and the first sentence of each
    description), deduplicated, ordered by a hash, at most `limit` rows."""
    rows, seen = [], set()
    for module in QA_LIBRARIES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the bundled QA set needs {module}, which is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            if any(p in ("tests", "test", "testing", "_vendor") for p in path.relative_to(root).parts):
                continue
            for doc in _docstrings(path):
                for entries in _parameter_sections(doc):
                    key = repr(entries)
                    if key not in seen:
                        seen.add(key)
                        rows.extend(_qa_rows_of(entries, key))
    rows.sort(key=lambda r: _key(r["id"]))
    return rows[:limit]


def write_parameter_qa_parquet(path: Path, limit: int = QA_EXAMPLES) -> Path:
    """The bundled QA set as Parquet, answers in Hugging Face datasets' form."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = parameter_questions(limit)
    table = pa.table({
        "id": [r["id"] for r in rows], "question": [r["question"] for r in rows],
        "context": [r["context"] for r in rows],
        "answers": [{"text": [a["text"] for a in r["answers"]], "answer_start": [a["answer_start"] for a in r["answers"]]}
                    for r in rows]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=512)
    return path
