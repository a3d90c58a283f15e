"""Augmentation throughput: our Ray Data pipeline (batched, fused ops) against a torch
DataLoader applying torchvision.transforms.v2 per sample, and how long the teacher waits for
data.

In one run, on the same machine and cores, with the same ordered ops (random resized crop,
flip, rotation, colour jitter, gaussian noise, random erasing, then mixup with soft labels):
  - ours:      `augment.train_stream` over the stored training split the data stage
               (`data.prepare`) wrote: Ray Data tasks (--cpus-per-task each) read one stored
               row group of `data.batch_size` rows (256 by default) from storage and augment it
               with augment.apply_ops (fused batched ops, per-sample randomness), consumed
               with `iter_torch_batches` in batches of --batch as a trainer does, on a local
               Ray of --cores CPUs;
  - baseline:  `torch.utils.data.DataLoader(num_workers=--cores)` over the same images (that
               training split, held in memory), each sample through a
               `torchvision.transforms.v2.Compose` of the same ops, v2.MixUp on each batch in
               collate, one torch thread per worker (spawned workers, persistent, counted
               over their second epoch);
on data sets (--sets) written as Parquet and prepared by the data stage (1% of the rows each to
the val and test splits, the rest to train): `rgb64`, synthetic 3x64x64 images as PNG (model
input 64); `digits`, the bundled digits (1x8x8 uint8 arrays, repeated to the set's size, model
input 16, as the demo); `rgb224`, synthetic 3x224x224 PNG images (model input 224). Images/s
are counted after the first batch (steady state; the start-up time is printed beside), best of --repeats (3; 2 with --quick), variants interleaved so that load
drifts on a shared machine hit both alike.

Then a short real teacher run (the demo's resnet10t, ZeRO-3 on 2 Ray Train workers, the same
ops on the digits) reports `data_wait_fraction`: rank 0's time waiting for the next batch over
its training-step time (first batch apart).

Targets: ours >= 1.5x the DataLoader's images/s (each data set); data wait < 5% of step time.

    python bench/augment_throughput.py [--quick] [--cores 2] [--repeats 3] [--no-teacher]
                                       [--sets rgb64,digits,rgb224] [--images N]
--quick: 2,048 images per set instead of 8,192, 2 repeats, a 1-epoch teacher instead of 3.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from harness import Bench, best, interleave

REPO = Path(__file__).resolve().parents[1]
OPS = [
    {"op": "random_resized_crop", "scale": [0.6, 1.0]},
    {"op": "flip"},
    {"op": "rotation", "degrees": 15},
    {"op": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    {"op": "gaussian_noise", "std": 0.05},
    {"op": "random_erasing", "p": 0.5},
    {"op": "mixup", "lambda_range": [0.0, 0.4]},
]


def config(image_size: int, cpus_per_task: float, aug_batch: int | None, extra: list[str] = ()):
    import yaml

    from raydistill.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", [
        f"data.augment={yaml.safe_dump(OPS, default_flow_style=True).strip()}", "sweep.num_trials=0",
        f"data.image_size={image_size}", f"data.cpus_per_task={cpus_per_task}",
        *([f"data.batch_size={aug_batch}"] if aug_batch else []), *extra])


SETS = {  # --sets name -> (label, channels, side, model input size); rows are PNG cells or uint8 arrays
    "rgb64": ("synthetic 3x64x64", 3, 64, 64),
    "digits": ("digits 1x8x8 -> 16", 1, 8, 16),
    "rgb224": ("synthetic 3x224x224", 3, 224, 224),
}
SPLIT_FRACTIONS = ["data.val_fraction=0.01", "data.test_fraction=0.01"]  # nearly every row to train


def source_rows(name: str, n: int):
    """(images uint8 (n, C, H, W), labels, write as PNG) of a set, before the data stage."""
    import numpy as np
    from sklearn.datasets import load_digits

    _, channels, side, _ = SETS[name]
    rng = np.random.default_rng(0)
    if name == "digits":
        # All 1,797 digits, repeated to n rows, so every set runs as long.
        d = load_digits()
        x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        reps = -(-n // len(x))
        return np.tile(x, (reps, 1, 1, 1))[:n], np.tile(d.target, reps)[:n].astype(np.int64), False
    return (rng.integers(0, 256, (n, channels, side, side), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64), True)


def datasets(names: list[str], n: int, aug_batch: int | None, work: Path) -> dict:
    """label -> (the prepared training split, a data.SplitRef; num_classes; model input size).
    Each set is written as Parquet and prepared by the data stage (needs a running Ray); its
    stored row groups hold `data.batch_size` rows, the unit ours augments."""
    from harness import prepared

    sets = {}
    for name in names:
        label, _, _, size = SETS[name]
        images, labels, png = source_rows(name, n)
        start = time.perf_counter()
        data = prepared(config(size, 1.0, aug_batch, SPLIT_FRACTIONS), images, labels, work / name, png=png,
                        rows_per_group=2048)
        del images, labels
        print(f"[augment_throughput] {label}: {data.rows_read} rows prepared in {time.perf_counter() - start:.1f} s, "
              f"{len(data.train)} to train in {len(data.train.groups)} row groups", flush=True)
        sets[label] = (data.train, data.num_classes, size)
    return sets


def _count(batches) -> dict:
    """Images/s of an iterator of (images, labels) batches, after its first batch."""
    start = time.perf_counter()
    first, n = None, 0
    for x, y in batches:
        if first is None:
            first = time.perf_counter()
        else:
            n += len(x)
        assert y.dim() == 2, "mixup must give soft labels"
    end = time.perf_counter()
    return {"images_per_s": n / (end - first), "first_batch_s": first - start}


def ours(split, num_classes: int, size: int, args) -> dict:
    from raydistill.augment import train_stream

    cfg = config(size, args.cpus_per_task, args.aug_batch)
    stream = train_stream(cfg, split, epochs=1, num_classes=num_classes)
    batches = stream.iter_torch_batches(batch_size=args.batch, drop_last=True,
                                        prefetch_batches=cfg.data.prefetch_batches)
    return _count((b["image"], b["label"]) for b in batches)


class _PerSample:
    """A map-style data set: each uint8 image through a torchvision v2 pipeline."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        import torch

        return self.transform(torch.from_numpy(self.images[i])), int(self.labels[i])


def torchvision_ops(size: int, channels: int):
    """OPS as torchvision.transforms.v2, per sample (mixup is per batch, in collate)."""
    import torch
    from torchvision.transforms import v2

    spec = {op["op"]: op for op in OPS}
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize((size, size), antialias=False),
        v2.RandomResizedCrop((size, size), scale=tuple(spec["random_resized_crop"]["scale"]), antialias=False),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(spec["rotation"]["degrees"]),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        v2.GaussianNoise(sigma=spec["gaussian_noise"]["std"], clip=True),
        v2.RandomErasing(p=0.5, scale=(0.02, 0.2)),
        v2.Normalize([0.5] * channels, [0.5] * channels),
    ])


def _one_thread(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)


class _MixupCollate:
    """Collate, then torchvision's batch MixUp; a class so that spawned workers can unpickle it."""

    def __init__(self, num_classes: int):
        from torchvision.transforms import v2

        self.mixup = v2.MixUp(alpha=0.2, num_classes=num_classes)

    def __call__(self, rows):
        from torch.utils.data import default_collate

        return self.mixup(*default_collate(rows))


def baseline(arrays, num_classes: int, size: int, args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    images, labels = arrays
    # Spawned, not forked, workers: this process already runs Ray's and torch's threads, and a
    # forked worker can inherit a lock held by one of them and wait forever (seen at 224 px).
    # Spawned workers start slowly and warm up over their first batches, so they persist and
    # the count is of the second epoch: the DataLoader's steady state.
    loader = DataLoader(_PerSample(images, labels, torchvision_ops(size, images.shape[1])), batch_size=args.batch,
                        shuffle=True, num_workers=args.cores, collate_fn=_MixupCollate(num_classes),
                        drop_last=True, worker_init_fn=_one_thread, prefetch_factor=4,
                        multiprocessing_context="spawn", persistent_workers=True,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:
        pass
    figures = _count(loader)
    del loader  # stops its workers
    return figures


def teacher_wait(args) -> dict:
    """A short real teacher run on the digits with the same ops: rank 0's data-wait figures."""
    from raydistill import pipeline

    epochs = 1 if args.quick else 3
    cfg = config(16, 0.25, args.aug_batch, [f"teacher.epochs={epochs}", "teacher.checkpoint_every_steps=1000000"])
    storage = tempfile.mkdtemp()
    summary = pipeline.run_stages(cfg, storage, "bench", ("teacher",))["teacher"]
    return {k: summary[k] for k in ("data_wait_fraction", "data_wait_ms_per_step", "data_first_batch_s",
                                    "data_wait_fraction_with_start", "samples_per_s", "steps", "accuracy")}


def main() -> None:
    bench = Bench("augment_throughput", __doc__, repeats=(3, 2),
                  target="ours >= 1.5x a torchvision.transforms.v2 DataLoader (images/s, each data set); "
                         "teacher data wait < 5% of step time")
    parser = bench.parser
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="CPUs for both pipelines")
    parser.add_argument("--batch", type=int, default=64, help="batch size the consumer takes (both pipelines)")
    parser.add_argument("--aug-batch", type=int, default=None,
                        help="ours: rows per augmentation task (data.batch_size; default: the config's)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="ours: CPUs per Ray Data augmentation task")
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher data-wait run (the target "
                        "is then not met: half of it is unmeasured)")
    parser.add_argument("--sets", default="rgb64,digits,rgb224",
                        help=f"comma-separated data sets, of {', '.join(SETS)} (default: all)")
    parser.add_argument("--images", type=int, default=None,
                        help="rows written per set (default 8,192; 2,048 with --quick)")
    args = bench.parse()
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETS]
    if unknown or not names:
        parser.error(f"--sets: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SETS)}")
    n = args.images or (2048 if args.quick else 8192)

    import logging
    import shutil

    import ray

    work = Path(tempfile.mkdtemp(prefix="augment_bench_"))
    ray.init(address="local", num_cpus=args.cores, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    wait = None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per execution otherwise
        sets = datasets(names, n, args.aug_batch, work)
        variants = {}
        for name, (split, classes, size) in sets.items():
            arrays = split.arrays()  # the DataLoader's copy of the same training images, in memory
            variants[f"{name} / ours"] = lambda s=split, c=classes, z=size: ours(s, c, z, args)
            variants[f"{name} / DataLoader"] = lambda a=arrays, c=classes, z=size: baseline(a, c, z, args)
        runs = interleave(variants, args.repeats)
        if not args.no_teacher:
            wait = teacher_wait(args)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    top = {k: best(v, "images_per_s") for k, v in runs.items()}
    ratios = {s: top[f"{s} / ours"]["images_per_s"] / top[f"{s} / DataLoader"]["images_per_s"] for s in sets}
    aug_batch = args.aug_batch or config(64, 1, None).data.batch_size
    print(f"\nops: {', '.join(op['op'] for op in OPS)}; batch {args.batch} (ours augments {aug_batch} rows "
          f"per task, {args.cpus_per_task} CPU each); {args.cores} cores; "
          f"{', '.join(str(len(split)) for split, _, _ in sets.values())} training images per set; "
          f"best of {args.repeats}\n")
    print(f"{'data set':22} {'pipeline':12} {'images/s':>9} {'vs DataLoader':>14} {'first batch s':>14}   all runs "
          "(images/s after the first batch)")
    for key, row in top.items():
        name, variant = key.split(" / ")
        ratio = f"{ratios[name]:.2f}x" if variant == "ours" else ""
        all_runs = " ".join(f"{r['images_per_s']:.0f}" for r in runs[key])
        print(f"{name:22} {variant:12} {row['images_per_s']:9.0f} {ratio:>14} {row['first_batch_s']:14.2f}   {all_runs}")
    if wait:
        print(f"\nteacher (resnet10t, ZeRO-3, 2 workers, digits, same ops): data wait "
              f"{100 * wait['data_wait_fraction']:.2f}% of step time ({wait['data_wait_ms_per_step']:.1f} ms/step; "
              f"first batch {wait['data_first_batch_s']:.2f} s apart; with it "
              f"{100 * wait['data_wait_fraction_with_start']:.1f}%), {wait['samples_per_s']:.0f} samples/s, "
              f"{wait['steps']} steps")
    throughput_met = all(r >= 1.5 for r in ratios.values())
    wait_met = None if wait is None else wait["data_wait_fraction"] < 0.05  # None: not measured (--no-teacher)
    images_per_s = {k: round(r["images_per_s"], 1) for k, r in top.items()}
    bench.finish(
        met=bool(throughput_met and wait_met),
        figures={
            "throughput_met": throughput_met, "wait_met": wait_met,
            "cores": args.cores, "batch": args.batch, "aug_batch": aug_batch, "cpus_per_task": args.cpus_per_task,
            "repeats": args.repeats, "images_written_per_set": n,
            "images_per_set": {name: len(split) for name, (split, _, _) in sets.items()},
            "ops": [op["op"] for op in OPS],
            "images_per_s": images_per_s,
            "first_batch_s": {k: r["first_batch_s"] for k, r in top.items()},
            "images_per_s_all_runs": {k: [round(r["images_per_s"], 1) for r in rs] for k, rs in runs.items()},
            "ratio": ratios,
            "teacher": wait,
        },
        compare=images_per_s,
        unit="images/s after the first batch (best run)",
    )


if __name__ == "__main__":
    main()
