"""Benchmark records: the shared harness writes a complete record, every benchmark goes through
it, and docs/benchmarks.md is exactly what bench/report.py makes of the committed records."""

from __future__ import annotations

import ast
import importlib.util
import json

from conftest import REPO

BENCH = REPO / "bench"
RECORD_KEYS = {"bench", "target", "met", "compare", "unit", "quick", "command", "commit", "dirty", "date",
               "wall_s", "machine", "load_average"}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finish_prints_the_json_line_and_writes_the_record(tmp_path, capsys):
    harness = _module("harness")
    bench = harness.Bench("toy", "A toy benchmark.", target="ours >= 2x baseline")
    bench.parser.add_argument("--size", type=int, default=3)
    out = tmp_path / "toy.json"
    args = bench.parse(["--quick", "--size", "5", "--out", str(out)])
    runs = harness.interleave({"baseline": lambda: {"rate": 1.0}, "ours": lambda: {"rate": 2.5}}, repeats=2)
    ours = harness.best(runs["ours"], "rate")["rate"]
    bench.finish(met=ours >= 2.0, figures={"speedup": ours / 1.0, "size": args.size, "per": {"a": 1 / 3}},
                 compare={"baseline": 1.0, "ours": ours}, unit="items/s")

    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {"bench": "toy", "target": "ours >= 2x baseline", "met": True, "speedup": 2.5, "size": 5,
                    "per": {"a": 0.3333}}
    record = json.loads(out.read_text())
    assert RECORD_KEYS <= set(record) and record["speedup"] == 2.5 and record["quick"] is True
    assert record["command"] == "python bench/toy.py --quick --size 5 --out " + str(out)
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu"]
    load = record["load_average"]
    assert load["max"] >= load["mean"] >= 0 and load["max"] >= load["start"]


def test_records_default_to_bench_results_and_quick_runs_keep_their_own_file():
    harness = _module("harness")
    bench = harness.Bench("toy", "", target="t")
    bench.parse([])
    assert bench.record_path() == BENCH / "results" / "toy.json"
    bench.parse(["--quick"])
    assert bench.record_path() == BENCH / "results" / "toy.quick.json"


def test_every_benchmark_goes_through_the_harness():
    for path in sorted(BENCH.glob("*.py")):
        if path.stem in ("harness", "report", "own_data_tasks"):  # shared by benchmarks, not one
            continue
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}
        assert {"Bench", "finish"} <= calls, f"{path.name} does not build a Bench and finish() it"


def test_benchmarks_page_is_generated_from_the_records(tmp_path):
    report = _module("report")
    out = tmp_path / "benchmarks.md"
    assert report.main(["--out", str(out)]) == 0
    records = sorted((BENCH / "results").glob("*.json"))
    assert records, "no benchmark records in bench/results/"
    assert (REPO / "docs" / "benchmarks.md").read_text() == out.read_text(), \
        "docs/benchmarks.md differs from the records: run `make bench-report`"
    for path in records:
        record = json.loads(path.read_text())
        assert RECORD_KEYS <= set(record), f"{path.name} lacks {RECORD_KEYS - set(record)}"
        assert f"    {record['command']}" in out.read_text()
        if record["compare"]:
            assert (tmp_path / "benchmarks" / f"{path.stem}.png").stat().st_size > 1000
