"""One teacher recipe: a sweep trial in process and the teacher stage on Ray Train, given the
same config, seed and steps, train the same way (engine config, schedule, clipping, batch, and
the same rows in the same order), so their loss curves are the same. A Ray of its own: a sweep
run before it in the same Ray could leave placement groups that hold CPUs."""

from __future__ import annotations

import pytest

from raydistill.config import load_config

from conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"
SMALL = "test_efficientnet"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_an_in_process_trial_trains_the_teacher_stages_recipe(tmp_path, local_ray):
    import ray

    from raydistill import pipeline
    from raydistill.data import Dataset

    sets = [f"teacher.arch={SMALL}", "teacher.num_workers=1", "teacher.cpus_per_worker=1", "teacher.epochs=2",
            "sweep.epochs=2", "sweep.cpus_per_trial=1", "sweep.num_trials=0", "teacher.grad_clip=0.5"]
    cfg = load_config(DEMO, sets)
    summary = pipeline.run_stages(cfg, str(tmp_path), "same", ("teacher",))["teacher"]
    data = Dataset.load(tmp_path / "same" / "data" / "splits")

    def in_process_losses(cfg, data) -> list[float]:  # local: shipped to the worker by value
        from raydistill.sweep import train_in_process

        reports = []
        train_in_process(cfg, data, reports.append)
        return [r["loss"] for r in reports]

    # In a Ray worker process, as a Tune trial runs (its own process group of one).
    losses = ray.get(ray.remote(num_cpus=1)(in_process_losses).remote(cfg, data))
    assert len(losses) == 2 and [s for s, _ in summary["loss_curve"]] == [19, 38]  # 1,259 rows / 64
    assert losses == pytest.approx([loss for _, loss in summary["loss_curve"]], rel=1e-5)
