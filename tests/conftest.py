"""Shared fixtures: small configs and data made on the fly (nothing is downloaded)."""

from __future__ import annotations

import io
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
