"""What `ray job submit --working-dir . --runtime-env runtime_env.yaml` uploads, checked with
Ray's own packaging code (the zip it would send), and that the README shows how to submit,
follow and watch a job."""

from __future__ import annotations

import zipfile
from pathlib import Path

import yaml

from conftest import REPO
from ray_internals import zip_upload

HEAVY = [".venv/lib/python3.11/site-packages/torch/x.py", "runs/demo/manifest.json", "data/train.parquet",
         "data/images/0.png", "teacher.safetensors", "lib/raydistill/__pycache__/config.cpython-311.pyc",
         ".pytest_cache/v/cache", ".git/HEAD", "student.onnx", "runs/demo/teacher/tensorboard/events.out",
         "raydistill.egg-info/PKG-INFO", "weights.pt"]
CODE = ["jobs/train.py", "lib/raydistill/config.py", "configs/demo.yaml", "serve/app.py", "runtime_env.yaml"]


def _excludes() -> list[str]:
    return yaml.safe_load((REPO / "runtime_env.yaml").read_text())["excludes"]


def _uploaded(root: Path, tmp_path: Path, include_gitignore: bool) -> set[str]:
    out = tmp_path / "pkg.zip"
    zip_upload(root, _excludes(), out, include_gitignore)
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_runtime_env_uploads_code_but_not_venv_runs_data_or_weights(tmp_path):
    tree = tmp_path / "repo"
    for rel in HEAVY + CODE:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    # Without .gitignore's help: the excludes alone must keep them out.
    uploaded = _uploaded(tree, tmp_path, include_gitignore=False)
    assert uploaded == set(CODE)


def test_the_real_upload_is_small(tmp_path):
    uploaded = _uploaded(REPO, tmp_path, include_gitignore=True)
    assert "jobs/pipeline.py" in uploaded and not any(n.startswith((".venv/", "runs/", ".git/")) for n in uploaded)
    assert (tmp_path / "pkg.zip").stat().st_size < 5 * 2**20


def test_readme_shows_submit_follow_and_dashboard():
    readme = (REPO / "README.md").read_text()
    assert "--entrypoint-num-cpus 0" in readme
    assert "ray job logs" in readme and "--follow" in readme
    assert "ray dashboard cluster.yaml" in readme
    assert "raydistill status" in readme
