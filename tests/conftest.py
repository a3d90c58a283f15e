"""Shared fixtures: small configs and data made on the fly (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Every test starts its own Ray (`address="local"`, or a LocalCluster head of its own), so the
# suite passes while another Ray head runs on the machine. A RAY_ADDRESS left in the shell
# (for `ray job submit` to a cluster) would make the pipeline's own connect_ray join that one.
os.environ.pop("RAY_ADDRESS", None)


def registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has registered a teacher checkpoint under run_dir. A checkpoint folder
    in storage is not enough: the controller registers it only when it next polls the workers,
    and persists what it registered in checkpoint_manager_snapshot.json (a Ray internal file,
    read only by tests)."""
    for snapshot in run_dir.glob("teacher/ray/teacher-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:  # caught mid-write
            pass
    return False


@pytest.fixture(scope="session")
def digits_parquet(tmp_path_factory) -> Path:
    from raydistill.data import write_digits_parquet

    return write_digits_parquet(tmp_path_factory.mktemp("digits") / "digits.parquet")


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_table(path: Path, images: list, labels: list, image_type=None) -> Path:
    table = pa.table({"image": pa.array(images, type=image_type), "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table, path)
    return path
