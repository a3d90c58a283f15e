import numpy as np
import pyarrow as pa
import pytest

from raydistill.config import load_config
from raydistill.data import DataError, augment_batch, load_dataset

from conftest import png_bytes, write_table


def test_digits_parquet_holds_the_real_digits(digits_parquet):
    data = load_dataset(load_config(None), str(digits_parquet))
    assert data.rows_read == 1797 and data.rows_skipped == {}
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.images.dtype == np.uint8 and data.train.images.max() == 255


def test_split_is_deterministic_by_seed(digits_parquet):
    a = load_dataset(load_config(None, ["seed=1"]), str(digits_parquet))
    b = load_dataset(load_config(None, ["seed=1"]), str(digits_parquet))
    c = load_dataset(load_config(None, ["seed=2"]), str(digits_parquet))
    assert np.array_equal(a.test.images, b.test.images)
    assert not np.array_equal(a.test.images, c.test.images)


def test_png_cells_and_numeric_cells_decode_alike(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(20, 8, 8), dtype=np.uint8)
    labels = list(range(10)) * 2
    png = write_table(tmp_path / "png.parquet", [png_bytes(i) for i in imgs], labels, pa.binary())
    num = write_table(tmp_path / "num.parquet", [i.ravel().tolist() for i in imgs], labels, pa.list_(pa.uint8()))
    cfg = load_config(None)
    a, b = load_dataset(cfg, str(png)), load_dataset(cfg, str(num))
    assert np.array_equal(a.train.images, b.train.images)


def _bad_table(tmp_path):
    rows = [png_bytes(np.full((8, 8), i * 15, dtype=np.uint8)) for i in range(15)]
    labels = [i % 3 for i in range(15)]
    rows[4] = b"this is not an image"
    labels[7] = None
    rows[9] = png_bytes(np.zeros((5, 5), dtype=np.uint8))
    return write_table(tmp_path / "bad.parquet", rows, labels, pa.binary())


def test_bad_rows_fail_naming_the_row(tmp_path):
    path = _bad_table(tmp_path)
    with pytest.raises(DataError, match=r"row 4: undecodable image"):
        load_dataset(load_config(None), str(path))


def test_bad_rows_skip_counts_each_reason(tmp_path):
    path = _bad_table(tmp_path)
    data = load_dataset(load_config(None, ["data.on_bad_rows=skip"]), str(path))
    assert data.rows_skipped == {"undecodable_image": 1, "missing_label": 1, "wrong_shape": 1}
    assert len(data.train) + len(data.val) + len(data.test) == 12


def test_missing_corrupt_and_wrong_columns(tmp_path, digits_parquet):
    cfg = load_config(None)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(cfg, str(tmp_path / "nope.parquet"))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(digits_parquet.read_bytes()[:500])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(cfg, str(corrupt))
    with pytest.raises(DataError, match="no column 'img'.*data.image_column.*columns: image, label"):
        load_dataset(load_config(None, ["data.image_column=img"]), str(digits_parquet))


def test_augmentation_is_fresh_per_epoch_and_reproducible(digits_parquet):
    cfg = load_config(None)
    data = load_dataset(cfg, str(digits_parquet))
    batch = {"image": data.train.images[:32], "label": data.train.labels[:32], "id": np.arange(32)}
    kw = {"seed": 0, "image_size": 16, "augment": cfg.data.augment.model_dump()}
    e0 = augment_batch(batch, epoch=0, **kw)["image"]
    again = augment_batch(batch, epoch=0, **kw)["image"]
    e1 = augment_batch(batch, epoch=1, **kw)["image"]
    assert e0.shape == (32, 1, 16, 16) and e0.dtype == np.float32
    assert np.array_equal(e0, again)
    assert not np.allclose(e0, e1)
    assert -1.0 <= e0.min() and e0.max() <= 1.0
