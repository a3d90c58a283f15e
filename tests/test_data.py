import numpy as np
import pyarrow as pa
import pytest

from raydistill.config import load_config
from raydistill.data import DataError, augment_batch, load_dataset
from raydistill.kd import kd_loss

from conftest import REPO, png_bytes, write_table


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
    kw = {"seed": 0, "image_size": 16, "augment": cfg.data.augment_spec()}
    e0 = augment_batch(batch, epoch=0, **kw)["image"]
    again = augment_batch(batch, epoch=0, **kw)["image"]
    e1 = augment_batch(batch, epoch=1, **kw)["image"]
    assert e0.shape == (32, 1, 16, 16) and e0.dtype == np.float32
    assert np.array_equal(e0, again)
    assert not np.allclose(e0, e1)
    assert -1.0 <= e0.min() and e0.max() <= 1.0


EVERY_OP = ("data.augment=[{op: random_resized_crop, scale: [0.5, 1.0]}, {op: flip}, {op: rotation, degrees: 30}, "
            "{op: affine, translate: 0.1}, {op: color_jitter}, {op: rand_augment, n: 2, magnitude: 9}, "
            "{op: gaussian_noise, std: 0.05}, {op: random_erasing, p: 0.5}, {op: mixup, lambda_range: [0.1, 0.4]}, "
            "{op: cutmix, p: 1.0}]")


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_draws_per_sample_and_mixing_makes_soft_labels(channels):
    cfg = load_config(None, [EVERY_OP, "sweep.num_trials=0"])
    # 16 copies of one image: any difference between the views is per-sample randomness.
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (channels, 12, 12), dtype=np.uint8)
    batch = {"image": np.repeat(one[None], 16, axis=0), "label": np.arange(16) % 4, "id": np.arange(100, 116)}
    kw = {"seed": 0, "image_size": 16, "augment": cfg.data.augment_spec(), "num_classes": 4}
    out = augment_batch(batch, epoch=0, **kw)
    x, y = out["image"], out["label"]
    assert x.shape == (16, channels, 16, 16) and y.shape == (16, 4) and y.dtype == np.float32
    assert len({v.tobytes() for v in x}) == 16  # every sample its own view
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    assert (y >= 0).all() and (y.max(axis=1) < 1.0).any()  # labels really mixed
    assert np.array_equal(x, augment_batch(batch, epoch=0, **kw)["image"])
    assert not np.allclose(x, augment_batch(batch, epoch=1, **kw)["image"])
    with pytest.raises(ValueError, match="mixup mixes labels: it needs the number of classes"):
        augment_batch(batch, epoch=0, **{**kw, "num_classes": None})


def test_soft_labels_feed_the_losses():
    """Mixed labels go where class ids went: one-hot rows give the very same losses."""
    import torch
    import torch.nn.functional as F

    logits, teacher = torch.randn(8, 5), torch.randn(8, 5)
    ids = torch.arange(8) % 5
    onehot = F.one_hot(ids, 5).float()
    assert torch.allclose(F.cross_entropy(logits, onehot), F.cross_entropy(logits, ids))
    assert torch.allclose(kd_loss(logits, teacher, onehot, 4.0, 0.5), kd_loss(logits, teacher, ids, 4.0, 0.5))
    mixed = 0.7 * onehot + 0.3 * onehot.roll(1, 0)
    assert not torch.allclose(kd_loss(logits, teacher, mixed, 4.0, 0.5), kd_loss(logits, teacher, ids, 4.0, 0.5))


@pytest.mark.parametrize("sets, message", [
    (["data.augment=[{op: blur}]"], "'data.augment.0': Input tag 'blur' found using 'op' does not match"),
    (["data.augment=[{op: rotation, degrees: 400}]"], "'data.augment.0.rotation.degrees': Input should be less than or equal to 180"),
    (["data.augment=[{op: flip, direction: diagonal}]"], "'data.augment.0.flip.direction'"),
    (["data.augment=[{op: mixup, lambda_range: [0.5, 0.1]}]"], "lambda_range must satisfy"),
    (["data.augment=[{op: flip}, {op: flip}]"], "data.augment lists flip more than once"),
    (["data.augment.affine.degreez=3"], "unknown key 'data.augment.affine.degreez': allowed here: p, degrees, translate, scale"),
    (["data.augment.rotation_deg=3"], "unknown key 'data.augment.rotation_deg': data.augment is an ordered list of ops"),
    (["data.augment.cutmix.beta=2"], "data.augment has no 'cutmix' op (listed: random_resized_crop, affine, gaussian_noise)"),
])
def test_bad_augment_config_exits_2_naming_the_key(tmp_path, capsys, sets, message):
    from raydistill.cli import main

    argv = ["data", "preview", "--out", str(tmp_path / "g.png"), "--set", "sweep.num_trials=0"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydistill: config error:") and message in err and "\n" not in err
    assert not (tmp_path / "g.png").exists()


def test_sweep_space_addresses_one_augment_op(tmp_path):
    cfg = load_config(None).with_values({"data.augment.affine.degrees": 3})
    assert [op.op for op in cfg.data.augment] == ["random_resized_crop", "affine", "gaussian_noise"]
    assert cfg.data.augment[1].degrees == 3.0 and cfg.data.augment[1].translate == 0.1
    assert cfg.value_of("data.augment.affine.degrees") == 3.0 and cfg.value_of("teacher.lr") == cfg.teacher.lr


def _image_folder(root, sizes=((8, 8), (12, 10))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("b_cat", "a_dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / "a_dog" / "grey.jpg")
    return root


def test_image_folder_via_uri_resizes_and_names_classes(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    data = load_dataset(load_config(None), root.as_uri())  # file:///...: any pyarrow filesystem URI
    assert data.class_names == ["a_dog", "b_cat"] and data.num_classes == 2
    assert data.rows_read == 13 and data.rows_skipped == {}
    assert data.input_shape == (3, 16, 16)  # decoded, resized to data.image_size, RGB
    grey = load_dataset(load_config(None, ["data.channels=1", "data.image_size=8"]), str(root))
    assert grey.input_shape == (1, 8, 8)
    labels = np.concatenate([grey.train.labels, grey.val.labels, grey.test.labels])
    assert sorted(np.bincount(labels)) == [6, 7]


def test_image_folder_bad_files_fail_naming_the_file_or_are_counted(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "a_dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "b_cat" / "notes.txt").write_text("hello")
    (root / "stray.png").write_bytes((root / "a_dog" / "0.png").read_bytes())
    with pytest.raises(DataError, match=r"file '.*/a_dog/broken\.png': undecodable image"):
        load_dataset(load_config(None), str(root))
    data = load_dataset(load_config(None, ["data.on_bad_rows=skip"]), str(root))
    assert data.rows_skipped == {"undecodable_image": 1, "not_an_image_file": 1, "outside_class_folder": 1}
    assert data.rows_read == 16 and len(data.train) + len(data.val) + len(data.test) == 13


def test_parquet_folder_via_uri_and_out_of_range_labels(tmp_path):
    from conftest import write_table

    folder = tmp_path / "pq"
    folder.mkdir()
    imgs = [np.full(16, i, dtype=np.uint8).tolist() for i in range(24)]
    write_table(folder / "part-0.parquet", imgs[:12], [i % 3 for i in range(12)], pa.list_(pa.uint8()))
    write_table(folder / "part-1.parquet", imgs[12:], [i % 3 for i in range(11)] + [7], pa.list_(pa.uint8()))
    data = load_dataset(load_config(None), folder.as_uri())
    assert data.rows_read == 24 and data.num_classes == 8 and data.input_shape == (1, 4, 4)
    with pytest.raises(DataError, match=r"row 23: label out of range"):
        load_dataset(load_config(None, ["data.num_classes=3"]), folder.as_uri())
    data = load_dataset(load_config(None, ["data.num_classes=3", "data.on_bad_rows=skip"]), str(folder))
    assert data.rows_skipped == {"label_out_of_range": 1} and data.num_classes == 3
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(load_config(None), (tmp_path / "nothing").as_uri())


def test_preview_writes_a_png_grid(tmp_path, digits_parquet, capsys):
    from PIL import Image

    from raydistill.cli import main

    out = tmp_path / "grid.png"
    rc = main(["data", "preview", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out), "--count", "12",
               "--set", f"data.source={digits_parquet}", "--set", "sweep.num_trials=0",
               "--set", "data.augment=[{op: rotation, degrees: 20}, {op: mixup}]"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (8 * 96, 2 * (96 + 16))
        assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 10  # not blank


def test_data_wait_counts_waits_apart_from_steps_and_the_first_batch():
    import time

    from raydistill.training import DataWait

    def slow_source():
        time.sleep(0.3)  # start-up: reported apart
        for i in range(5):
            yield i
            time.sleep(0.05)  # the producer lags: every later next() waits

    wait = DataWait()
    for _ in wait.wrap(slow_source()):
        wait.timed(time.sleep, 0.01)
    assert wait.first_s >= 0.3 and wait.batches == 4
    assert wait.wait_s >= 4 * 0.05 and wait.step_s >= 5 * 0.01
    assert 0.5 < wait.fraction < 1.0
    fast = DataWait()
    for _ in fast.wrap(range(5)):
        fast.timed(time.sleep, 0.02)
    assert fast.fraction < 0.05
