import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.augment import augment_batch
from raydistill.config import load_config
from raydistill.data import DataError, Dataset, prepare
from raydistill.kd import kd_loss

from conftest import REPO, png_bytes, write_table


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """Preparation reads and checks rows in Ray Data tasks: one local Ray for the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def load(cfg, source, tmp_path, name="splits") -> Dataset:
    return prepare(cfg, str(source), tmp_path / name)


def ids(split) -> np.ndarray:
    return np.sort(np.concatenate([b.ids for b in split.batches()]))


def test_digits_parquet_holds_the_real_digits(digits_parquet, tmp_path):
    data = load(load_config(None), digits_parquet, tmp_path)
    assert data.rows_read == 1797 and data.rows_skipped == {}
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    images, labels = data.train.arrays()
    assert images.dtype == np.uint8 and images.max() == 255 and images.shape == (len(data.train), 1, 8, 8)
    # Stored in row groups of data.batch_size rows: the unit every reader streams.
    assert {n for _, _, n in data.train.groups[:-1]} <= {256} and len(np.unique(ids(data.train))) == len(data.train)
    assert Dataset.load(tmp_path / "splits").groups == data.groups


def test_split_is_deterministic_by_seed_and_independent_of_layout(digits_parquet, tmp_path):
    a = load(load_config(None, ["seed=1"]), digits_parquet, tmp_path, "a")
    b = load(load_config(None, ["seed=1", "data.batch_size=100"]), digits_parquet, tmp_path, "b")
    c = load(load_config(None, ["seed=2"]), digits_parquet, tmp_path, "c")
    assert np.array_equal(ids(a.test), ids(b.test)) and np.array_equal(ids(a.train), ids(b.train))
    assert not np.array_equal(ids(a.test), ids(c.test))
    # The same rows in smaller row groups (more preparation tasks): the same splits.
    relaid = tmp_path / "relaid" / digits_parquet.name
    relaid.parent.mkdir()
    pq.write_table(pq.read_table(digits_parquet), relaid, row_group_size=300)
    d = load(load_config(None, ["seed=1"]), relaid, tmp_path, "d")
    assert np.array_equal(ids(a.test), ids(d.test)) and np.array_equal(ids(a.val), ids(d.val))
    # A file appended beside the data leaves every earlier row in its split.
    pq.write_table(pq.read_table(digits_parquet).slice(0, 200), relaid.parent / "z-more.parquet")
    e = load(load_config(None, ["seed=1"]), relaid.parent, tmp_path, "e")
    assert set(ids(d.test)) <= set(ids(e.test)) and set(ids(d.train)) <= set(ids(e.train))
    assert len(e.test) + len(e.val) + len(e.train) == 1797 + 200


def test_png_cells_and_numeric_cells_decode_alike(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    labels = list(range(10)) * 4
    for kind in ("png", "num"):
        (tmp_path / kind).mkdir()
    png = write_table(tmp_path / "png" / "t.parquet", [png_bytes(i) for i in imgs], labels, pa.binary())
    num = write_table(tmp_path / "num" / "t.parquet", [i.ravel().tolist() for i in imgs], labels, pa.list_(pa.uint8()))
    cfg = load_config(None)
    a, b = load(cfg, png, tmp_path, "a"), load(cfg, num, tmp_path, "b")
    assert np.array_equal(a.train.arrays()[0], b.train.arrays()[0])


def _bad_table(tmp_path):
    rows = [png_bytes(np.full((8, 8), i * 15, dtype=np.uint8)) for i in range(15)]
    labels = [i % 3 for i in range(15)]
    rows[4] = b"this is not an image"
    labels[7] = None
    rows[9] = png_bytes(np.zeros((5, 5), dtype=np.uint8))
    return write_table(tmp_path / "bad.parquet", rows, labels, pa.binary())


def test_bad_rows_fail_naming_the_file_and_row(tmp_path):
    path = _bad_table(tmp_path)
    with pytest.raises(DataError, match=r"file '.*bad\.parquet' row 4: undecodable image"):
        load(load_config(None), path, tmp_path)
    assert not (tmp_path / "splits").exists()


def test_bad_rows_skip_counts_each_reason(tmp_path):
    path = _bad_table(tmp_path)
    data = load(load_config(None, ["data.on_bad_rows=skip", "data.val_fraction=0.3", "data.test_fraction=0.3"]),
                path, tmp_path)
    assert data.rows_skipped == {"undecodable_image": 1, "missing_label": 1, "wrong_shape": 1}
    assert len(data.train) + len(data.val) + len(data.test) == 12


def test_missing_corrupt_and_wrong_columns(tmp_path, digits_parquet):
    cfg = load_config(None)
    with pytest.raises(DataError, match="no such file"):
        load(cfg, tmp_path / "nope.parquet", tmp_path)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(digits_parquet.read_bytes()[:500])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load(cfg, corrupt, tmp_path)
    with pytest.raises(DataError, match="no column 'img'.*data.image_column.*columns: image, label"):
        load(load_config(None, ["data.image_column=img"]), digits_parquet, tmp_path)


def test_a_corrupt_file_among_good_ones_is_named_or_counted(tmp_path, digits_parquet):
    folder = tmp_path / "parts"
    folder.mkdir()
    table = pq.read_table(digits_parquet)
    pq.write_table(table.slice(0, 900), folder / "a.parquet")
    pq.write_table(table.slice(900), folder / "c.parquet")
    (folder / "b.parquet").write_bytes((folder / "c.parquet").read_bytes()[:-300])  # footer cut off
    with pytest.raises(DataError, match=r"file '.*/b\.parquet': unreadable file"):
        load(load_config(None), folder, tmp_path)
    data = load(load_config(None, ["data.on_bad_rows=skip"]), folder, tmp_path)
    assert data.rows_skipped == {"unreadable_file": 1}
    assert len(data.train) + len(data.val) + len(data.test) == 1797


def test_an_empty_split_is_an_error_naming_the_source(tmp_path):
    path = write_table(tmp_path / "few.parquet", [np.full(16, i, dtype=np.uint8).tolist() for i in range(12)],
                       [i % 2 for i in range(12)], pa.list_(pa.uint8()))
    with pytest.raises(DataError, match=r"few\.parquet': the (val|test) split is empty"):
        load(load_config(None, ["data.val_fraction=0.01", "data.test_fraction=0.01"]), path, tmp_path)


def test_a_failed_preparation_leaves_the_earlier_splits_intact(tmp_path, digits_parquet):
    good = load(load_config(None), digits_parquet, tmp_path)
    before = (tmp_path / "splits" / "index.json").read_bytes()
    with pytest.raises(DataError):
        load(load_config(None), _bad_table(tmp_path), tmp_path)
    assert (tmp_path / "splits" / "index.json").read_bytes() == before
    assert Dataset.load(tmp_path / "splits").groups == good.groups
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_augmentation_is_fresh_per_epoch_and_reproducible(digits_parquet, tmp_path):
    cfg = load_config(None)
    head = load(cfg, digits_parquet, tmp_path).train.head(32)
    batch = {"image": head.images, "label": head.labels, "id": head.ids}
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


PER_CLASS = 30  # enough for every class to land in each of train/val/test


def _image_folder(root, sizes=((8, 8), (12, 10))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("b_cat", "a_dog"):
        (root / cls).mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / "a_dog" / "grey.jpg")
    return root


def test_image_folder_via_uri_resizes_and_names_classes(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    data = load(load_config(None), root.as_uri(), tmp_path, "a")  # file:///...: any pyarrow filesystem URI
    assert data.class_names == ["a_dog", "b_cat"] and data.num_classes == 2
    assert data.rows_read == 2 * PER_CLASS + 1 and data.rows_skipped == {}
    assert data.input_shape == (3, 16, 16)  # decoded, resized to data.image_size, RGB
    grey = load(load_config(None, ["data.channels=1", "data.image_size=8"]), root, tmp_path, "b")
    assert grey.input_shape == (1, 8, 8)
    labels = np.concatenate([grey.split(s).arrays()[1] for s in ("train", "val", "test")])
    assert sorted(np.bincount(labels)) == [PER_CLASS, PER_CLASS + 1]


def test_image_folder_row_groups_mix_the_classes_whatever_the_task_size(tmp_path, monkeypatch):
    """Training batches are cut from stored row groups; a group read from one class folder
    would make every batch a single class, and a network trained on those learns nothing."""
    import raydistill.data

    root = _image_folder(tmp_path / "imgs")
    cfg = load_config(None, ["data.batch_size=8"])
    whole = load(cfg, root, tmp_path, "whole")
    monkeypatch.setattr(raydistill.data, "FILES_PER_TASK", 16)  # 4 tasks instead of 1
    cut = load(cfg, root, tmp_path, "cut")
    assert len({f for f, _, _ in cut.train.groups}) > 2
    for data in (whole, cut):
        full = [b.labels for b in data.train.batches() if len(b.labels) == 8]
        assert full and all(len(set(labels.tolist())) == 2 for labels in full)
    for split in ("train", "val", "test"):  # the split of a row does not depend on the tasks
        assert np.array_equal(ids(whole.split(split)), ids(cut.split(split)))


def test_parquet_rows_sorted_by_label_are_mixed_before_training(tmp_path, capsys, monkeypatch):
    """A Parquet source sorted by label would store row groups of one class; the data stage
    rewrites its training split in hash buckets: the same rows, every row group mixed."""
    from raydistill import data as data_module

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 80)
    imgs = [rng.integers(0, 256, 16, dtype=np.uint8).tolist() for _ in labels]
    cfg = load_config(None, ["data.batch_size=8"])
    monkeypatch.setattr(data_module, "FILES_PER_TASK", 32)  # several buckets from 240 rows
    write_table(tmp_path / "sorted.parquet", imgs, labels.tolist(), pa.list_(pa.uint8()))
    mixed = load(cfg, tmp_path / "sorted.parquet", tmp_path, "sorted")
    assert "rows sorted by label?): mixing the stored training rows" in capsys.readouterr().out
    full = [mixed.train.read(g) for g in mixed.train.groups if g[2] == 8]
    assert len(full) > 10 and all(len(set(b.labels)) > 1 for b in full)

    monkeypatch.setattr(data_module, "_sorted_by_label", lambda *args: False)
    kept = load(cfg, tmp_path / "sorted.parquet", tmp_path, "kept")
    assert sum(len(set(kept.train.read(g).labels)) == 1 for g in kept.train.groups) > len(kept.train.groups) / 2

    def rows(split):  # (id, label, pixels) of every stored row, in id order
        return sorted((int(i), int(y), x.tobytes()) for b in split.batches() for i, y, x in zip(b.ids, b.labels, b.images))

    assert rows(mixed.train) == rows(kept.train) and rows(mixed.val) == rows(kept.val)
    assert Dataset.load(tmp_path / "sorted").train.groups == mixed.train.groups  # the index names the mixed files

    order = rng.permutation(len(labels))
    write_table(tmp_path / "shuffled.parquet", [imgs[i] for i in order], labels[order].tolist(), pa.list_(pa.uint8()))
    load(cfg, tmp_path / "shuffled.parquet", tmp_path, "shuffled")
    assert "single class" not in capsys.readouterr().out


def test_image_folder_bad_files_fail_naming_the_file_or_are_counted(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "a_dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "b_cat" / "notes.txt").write_text("hello")
    (root / "stray.png").write_bytes((root / "a_dog" / "0.png").read_bytes())
    # A task stops at its first bad row, so which one is named depends on the hash order.
    named = r"(a_dog/broken\.png': undecodable image|b_cat/notes\.txt': not an image file|stray\.png': outside class)"
    with pytest.raises(DataError, match=r"file '.*/" + named):
        load(load_config(None), root, tmp_path)
    data = load(load_config(None, ["data.on_bad_rows=skip"]), root, tmp_path)
    assert data.rows_skipped == {"undecodable_image": 1, "not_an_image_file": 1, "outside_class_folder": 1}
    assert data.rows_read == 2 * PER_CLASS + 4 and len(data.train) + len(data.val) + len(data.test) == 2 * PER_CLASS + 1


def test_a_single_class_or_a_class_folder_too_small_to_split_is_refused_by_name(tmp_path):
    from PIL import Image

    root = _image_folder(tmp_path / "imgs")
    (root / "c_few").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / "c_few" / f"{i}.png")
    with pytest.raises(DataError, match=r"class folder 'c_few' has 2 usable images, too few for every split to "
                                        r"hold one \(train/val/test = \d/\d/\d"):
        load(load_config(None), root, tmp_path, "few")
    single = tmp_path / "single"
    shutil.copytree(root / "a_dog", single / "a_dog")
    with pytest.raises(DataError, match=r"holds a single class \('a_dog'\): a classifier needs at least two"):
        load(load_config(None), single, tmp_path, "single")


def test_parquet_folder_via_uri_and_out_of_range_labels(tmp_path):
    from conftest import write_table

    folder = tmp_path / "pq"
    folder.mkdir()
    imgs = [np.full(16, i, dtype=np.uint8).tolist() for i in range(24)]
    write_table(folder / "part-0.parquet", imgs[:12], [i % 3 for i in range(12)], pa.list_(pa.uint8()))
    write_table(folder / "part-1.parquet", imgs[12:], [i % 3 for i in range(11)] + [7], pa.list_(pa.uint8()))
    data = load(load_config(None), folder.as_uri(), tmp_path)
    assert data.rows_read == 24 and data.num_classes == 8 and data.input_shape == (1, 4, 4)
    with pytest.raises(DataError, match=r"part-1\.parquet' row 11: label out of range"):
        load(load_config(None, ["data.num_classes=3"]), folder.as_uri(), tmp_path)
    data = load(load_config(None, ["data.num_classes=3", "data.on_bad_rows=skip"]), folder, tmp_path)
    assert data.rows_skipped == {"label_out_of_range": 1} and data.num_classes == 3
    with pytest.raises(DataError, match="no such file or folder"):
        load(load_config(None), (tmp_path / "nothing").as_uri(), tmp_path)


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


def test_stored_images_are_bytes_and_splits_stored_as_uint8_lists_still_read(tmp_path):
    from raydistill.data import read_group, store_arrays

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    data = store_arrays(tmp_path / "new", {s: (images, np.arange(5)) for s in ("train", "val", "test")})
    file, group, _ = data.train.groups[0]
    assert pq.ParquetFile(tmp_path / "new" / file).schema_arrow.field("image").type == pa.binary(48)
    assert np.array_equal(read_group(data.root, file, group, (3, 4, 4)).images, images)
    old = pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 48),
                    "label": pa.array(np.arange(5)), "id": pa.array(np.arange(5))})
    pq.write_table(old, tmp_path / "old.parquet")
    assert np.array_equal(read_group(str(tmp_path), "old.parquet", 0, (3, 4, 4)).images, images)
