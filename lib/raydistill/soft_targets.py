"""Offline teacher mode: Ray Data batch inference writes the teacher's logits beside the very
augmented views the student will train on, as Parquet; the student then trains on those.

For a teacher too large to sit beside the student in every training worker: the teacher runs
once per view in a pool of actors (on GPUs when asked for), and the student workers only read
(view, label, teacher_logits) rows. Views are the same ones the online mode would produce:
`augment.train_stream` augments with seed (seed, epoch, row id), so the stored stream is exactly
the stream the student would otherwise see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raydistill.config import Config

SOFT_TARGETS_DIR = "soft_targets"
LOGITS_COLUMN = "teacher_logits"


class TeacherLogits:
    """Ray Data actor: loads the teacher once (hash-checked safetensors), then adds a
    `teacher_logits` column (B, classes) to each batch of augmented views (B, C, S, S)."""

    def __init__(self, weights: str, sha256: str | None, use_gpu: bool, threads: int):
        import torch

        from raydistill.artifacts import load_weights
        from raydistill.models import load_network

        torch.set_num_threads(max(1, threads))
        state, meta = load_weights(Path(weights), sha256)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.net = load_network(state, meta).to(self.device).eval()

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.inference_mode():
            views = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
            logits = self.net(views).float().cpu().numpy()
        return {**batch, LOGITS_COLUMN: logits}


def write_soft_targets(cfg: Config, data, teacher_path: Path, teacher_sha256: str | None,
                       rows_per_epoch: int, out_dir: Path) -> list[Path]:
    """Run the teacher over every augmented view of every epoch; write Parquet files into
    out_dir/soft_targets/ (columns image, label, teacher_logits). Returns the files."""
    import shutil

    import ray.data

    from raydistill.augment import train_stream

    scfg = cfg.student
    target = out_dir / SOFT_TARGETS_DIR
    shutil.rmtree(target, ignore_errors=True)  # a half-written earlier attempt must not mix in
    views = train_stream(cfg, data.train, scfg.epochs, rows_per_epoch, num_classes=data.num_classes)
    with_logits = views.map_batches(
        TeacherLogits,
        fn_constructor_kwargs={"weights": str(teacher_path), "sha256": teacher_sha256,
                               "use_gpu": scfg.use_gpu, "threads": int(scfg.offline_cpus_per_actor)},
        compute=ray.data.ActorPoolStrategy(size=scfg.offline_actors),
        batch_size=scfg.offline_batch_size,
        batch_format="numpy",
        num_cpus=scfg.offline_cpus_per_actor,
        num_gpus=1 if scfg.use_gpu else 0,
        udf_modifying_row_count=False,
    )
    # File order need not follow epochs: the student consumes every stored view exactly once
    # (epochs x rows_per_epoch rows = its step plan), whatever the order.
    with_logits.write_parquet(str(target), min_rows_per_file=rows_per_epoch)
    return sorted(target.glob("*.parquet"))


def read_soft_targets(files: list[Path]):
    """The stored views and logits as a Ray Data stream for the student's Ray Train workers."""
    import ray.data

    return ray.data.read_parquet([str(f) for f in files], shuffle=None)
