"""Generated image-folder classification tasks as a user has them, and a plain-CNN baseline.

A user who brings their own images rarely has a tidy data set: the files in one folder have
different sizes and aspect ratios, some are greyscale, some carry an alpha channel, some are
palette PNGs, and PNG and JPEG are mixed. The tasks here are written in that shape, so that a
benchmark can run the tool on data like a user's and compare it with what a dozen lines of
PyTorch reach on the same images.

    make_task(name, root, per_class, held_out_per_class, seed)
        writes root/name/train/<class>/<i>.<ext> and root/name/held_out/<class>/<i>.<ext>
    baseline_cnn(train_dir, held_out_dir)
        a plain 3-layer CNN (Adam, 60 epochs, random horizontal flips only) at 32 px

Each image: width drawn between 24 and 96 px, height within 1.3x of it (and the same range);
shapes span 50-90% of the short side; mode drawn among "L",
"RGB", "RGBA" (with a partly transparent alpha) and "P"; saved as PNG or JPEG (JPEG only for
"L" and "RGB", which it can hold). Tasks (TASKS):

    shapes   circle, square, triangle: one filled shape, random size, position, rotation and
             colours (one light, one dark: at least 150 apart in luminance), mild noise
    stripes  horizontal, vertical, diagonal (45 deg), antidiagonal (135 deg): two-colour
             stripes of random period (4-12 px) and phase, +-8 deg of jitter, mild noise
    marks    plus, cross, ring, dot: one thick-line glyph, random size, position, colours and
             tilt (up to 20 deg)
    shapes6  circle, square, triangle, pentagon, hexagon, star: shapes with more classes, a
             related task to pretrain on

Everything is drawn from a numpy Generator seeded by (seed, task, split), so train and
held-out images differ and a task is the same on every machine.

    python bench/own_data_tasks.py [TASK ...]    # default: shapes
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS: dict[str, list[str]] = {
    "shapes": ["circle", "square", "triangle"],
    "stripes": ["horizontal", "vertical", "diagonal", "antidiagonal"],
    "marks": ["plus", "cross", "ring", "dot"],
    "shapes6": ["circle", "square", "triangle", "pentagon", "hexagon", "star"],
}

MIN_SIDE, MAX_SIDE = 24, 96
MAX_ASPECT = 1.3
MODES = ("L", "RGB", "RGBA", "P")
JPEG_MODES = ("L", "RGB")  # JPEG holds neither an alpha channel nor a palette
# One colour light, the other dark. At a gap of 40 the colour pairs alone hide the shapes from
# the baseline at 100 images a class (held-out accuracy about 0.57 on shapes, 0.80 at 150).
MIN_LUMINANCE_GAP = 150.0

# Sides of the regular polygons; a star is drawn as a 5-pointed polygon with inner vertices.
POLYGON_SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
STRIPE_ANGLES = {"horizontal": 0.0, "vertical": 90.0, "diagonal": 45.0, "antidiagonal": 135.0}

Colour = tuple[int, int, int]


def make_task(
    name: str, root: Path, per_class: int, held_out_per_class: int, seed: int = 0
) -> tuple[Path, Path, list[str]]:
    """Write task `name` under root/name; return (train_dir, held_out_dir, sorted class names).

    Refuses a task directory that already holds files, so that images left from another run
    (another count or seed) never mix into this one.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    task_dir = Path(root) / name
    if task_dir.exists() and any(task_dir.iterdir()):
        raise FileExistsError(f"{task_dir} is not empty")
    classes = sorted(TASKS[name])
    splits = {"train": per_class, "held_out": held_out_per_class}
    for split, count in splits.items():
        rng = _rng(seed, name, split)
        for cls in classes:
            cls_dir = task_dir / split / cls
            cls_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _save_as_user(_render(name, cls, rng), cls_dir / str(i), rng)
    return task_dir / "train", task_dir / "held_out", classes


def _rng(seed: int, name: str, split: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break reproducibility.
    words = [seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())]
    return np.random.default_rng(np.random.SeedSequence(words))


def _render(task: str, cls: str, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 image of class `cls`, noise included."""
    # Sides drawn apart, within MAX_ASPECT of each other: photos are rarely square, rarely strips.
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(np.clip(width * rng.uniform(1 / MAX_ASPECT, MAX_ASPECT), MIN_SIDE, MAX_SIDE))
    background, foreground = _contrasting_colours(rng)
    if task == "stripes":
        pixels = _stripes(width, height, STRIPE_ANGLES[cls], background, foreground, rng)
    else:
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        if task == "marks":
            _draw_mark(draw, cls, width, height, foreground, rng)
        else:
            _draw_shape(draw, cls, width, height, foreground, rng)
        pixels = np.asarray(image)
    return _add_noise(pixels, rng)


def _contrasting_colours(rng: np.random.Generator) -> tuple[Colour, Colour]:
    """Two random colours far enough apart in luminance to stay apart in greyscale too."""
    while True:
        a, b = rng.integers(0, 256, size=(2, 3))
        if abs(_luminance(a) - _luminance(b)) > MIN_LUMINANCE_GAP:
            return tuple(int(v) for v in a), tuple(int(v) for v in b)


def _luminance(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _centre(width: int, height: int, radius: float, rng: np.random.Generator) -> tuple[float, float]:
    # Up to a fifth of the radius may cross the border: mostly inside, not always centred.
    margin = 0.8 * radius
    x = rng.uniform(min(margin, width / 2), max(width - margin, width / 2))
    y = rng.uniform(min(margin, height / 2), max(height - margin, height / 2))
    return x, y


def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    """Vertices evenly spaced in angle, vertex k at distance radii[k] from the centre."""
    step = 2 * math.pi / len(radii)
    return [
        (cx + r * math.cos(rotation + k * step), cy + r * math.sin(rotation + k * step))
        for k, r in enumerate(radii)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, cls: str, width: int, height: int, fill: Colour, rng: np.random.Generator
) -> None:
    """One filled shape whose extent is 50-90% of the short side, at a random rotation."""
    radius = rng.uniform(0.5, 0.9) * min(width, height) / 2
    cx, cy = _centre(width, height, radius, rng)
    rotation = rng.uniform(0, 2 * math.pi)
    if cls == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif cls == "star":
        draw.polygon(_polygon(cx, cy, [radius, 0.45 * radius] * 5, rotation), fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, [radius] * POLYGON_SIDES[cls], rotation), fill=fill)


def _draw_mark(
    draw: ImageDraw.ImageDraw, cls: str, width: int, height: int, ink: Colour, rng: np.random.Generator
) -> None:
    """One thick-line glyph; a dot is a small filled circle, a ring a mostly larger unfilled one."""
    short = min(width, height)
    # Glyphs of 20-60% of the short side, lines of 20-35% of the radius, dots of 12-28%: the
    # small thick rings come close to dots at 32 px, which keeps the task from being trivial
    # (with larger glyphs the baseline scored 1.0 at 300 images a class).
    radius = rng.uniform(0.06, 0.14) * short if cls == "dot" else rng.uniform(0.1, 0.3) * short
    line = max(1, round(rng.uniform(0.2, 0.35) * radius))
    cx, cy = _centre(width, height, radius, rng)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if cls == "dot":
        draw.ellipse(box, fill=ink)
    elif cls == "ring":
        draw.ellipse(box, outline=ink, width=line)
    else:
        # Up to 20 degrees of tilt: a plus and a cross are then as little as 5 degrees apart.
        tilt = math.radians(rng.uniform(-20, 20)) + (math.pi / 4 if cls == "cross" else 0.0)
        for angle in (tilt, tilt + math.pi / 2):
            dx, dy = radius * math.cos(angle), radius * math.sin(angle)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=ink, width=line)


def _stripes(
    width: int, height: int, angle: float, a: Colour, b: Colour, rng: np.random.Generator
) -> np.ndarray:
    """Two-colour stripes running at `angle` degrees (0 = horizontal; y grows downwards, so 45
    runs from the top left to the bottom right), with jitter of the angle, period and phase.

    Computed per pixel with numpy rather than drawn polygon by polygon: the stripes' edges are
    the same hard edges, without the bookkeeping of clipping them to the image.
    """
    theta = math.radians(angle + rng.uniform(-8, 8))
    period = rng.uniform(4, 12)
    y, x = np.mgrid[0:height, 0:width]
    # Distance across the stripes: along the normal to their direction.
    across = -x * math.sin(theta) + y * math.cos(theta) + rng.uniform(0, period)
    first = (across % period) < period / 2
    return np.where(first[..., None], np.array(a, np.uint8), np.array(b, np.uint8))


def _add_noise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(3, 10)
    noisy = pixels.astype(np.float32) + rng.normal(0, sigma, size=pixels.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _save_as_user(pixels: np.ndarray, stem: Path, rng: np.random.Generator) -> Path:
    """Save in a random mode and format; returns the path written."""
    image = Image.fromarray(pixels, "RGB")
    mode = MODES[int(rng.integers(len(MODES)))]
    if mode == "RGBA":
        image.putalpha(_partial_alpha(image.width, image.height, rng))
    elif mode != "RGB":
        image = image.convert(mode)  # "P": Pillow's web palette with dithering, as most tools do
    if mode in JPEG_MODES and rng.random() < 0.5:
        path = stem.with_suffix(".jpg")
        image.save(path, quality=int(rng.integers(70, 96)))
    else:
        path = stem.with_suffix(".png")
        image.save(path)
    return path


def _partial_alpha(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An alpha that fades from partly transparent at one edge to opaque at the other."""
    lowest = rng.uniform(64, 224)
    if rng.random() < 0.5:
        grid = np.broadcast_to(np.linspace(lowest, 255, width), (height, width))
    else:
        grid = np.broadcast_to(np.linspace(lowest, 255, height)[:, None], (height, width))
    return Image.fromarray(np.rint(grid).astype(np.uint8), "L")


def baseline_cnn(
    train_dir: Path, held_out_dir: Path, size: int = 32, epochs: int = 60, seed: int = 0, threads: int = 2
) -> dict:
    """Train a plain 3-layer CNN on train_dir and return its accuracy on held_out_dir.

    What a user writes in a dozen lines of PyTorch: every image converted to RGB and resized
    to size x size (bilinear), Adam (lr 1e-3), batch 32, random horizontal flips only. Class
    index = sorted class folder names. "seconds" counts loading, training and evaluation.
    """
    import torch
    from torch import nn

    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        classes = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir())
        x_train, y_train = _load_folder(Path(train_dir), classes, size)
        x_held, y_held = _load_folder(Path(held_out_dir), classes, size)

        model = nn.Sequential(
            *_conv_block(3, 32), *_conv_block(32, 64), *_conv_block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(classes)),
        )
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(x_train)).split(32):
                if len(batch) < 2:
                    continue  # BatchNorm cannot train on a batch of one
                x = x_train[batch]
                flip = torch.rand(len(x)) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
                optimiser.zero_grad()
                loss_fn(model(x), y_train[batch]).backward()
                optimiser.step()

        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(x).argmax(1) for x in x_held.split(256)])
        accuracy = (predicted == y_held).float().mean().item()
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "held_out_accuracy": accuracy,
        "train_images": len(x_train),
        "held_out_images": len(x_held),
        "seconds": time.perf_counter() - start,
    }


def _conv_block(cin: int, cout: int) -> list:
    from torch import nn

    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]


def _load_folder(folder: Path, classes: list[str], size: int):
    """(N, 3, size, size) float tensor normalised to -1..1, and (N,) int64 labels."""
    import torch

    images, labels = [], []
    for index, cls in enumerate(classes):
        for path in sorted((folder / cls).iterdir()):
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
            images.append(np.asarray(rgb, dtype=np.float32) / 255.0)
            labels.append(index)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return (x - 0.5) / 0.5, torch.tensor(labels, dtype=torch.int64)


def _describe(train_dir: Path) -> Counter:
    """How many files of each (mode, extension) a split holds."""
    counts: Counter = Counter()
    for path in train_dir.rglob("*.*"):
        with Image.open(path) as img:
            counts[(img.mode, path.suffix)] += 1
    return counts


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            train_dir, _, classes = make_task(task, Path(tmp) / "look", per_class=10, held_out_per_class=5)
            counts = ", ".join(f"{mode} {ext}: {n}" for (mode, ext), n in sorted(_describe(train_dir).items()))
            print(f"{task} ({', '.join(classes)}): {counts}")
        for task in sys.argv[1:] or ["shapes"]:
            train_dir, held_out_dir, _ = make_task(task, Path(tmp), per_class=100, held_out_per_class=30)
            print(task, baseline_cnn(train_dir, held_out_dir))
