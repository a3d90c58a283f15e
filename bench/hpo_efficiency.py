"""HPO efficiency: Bayesian search + early stopping against random search, at an equal budget.

Compared, in one run, with the project's own sweep (raydistill.sweep.run_sweep):
  - ours:     Optuna TPE + ASHA (the sweep's default searcher and scheduler),
  - baseline: random search + FIFO (every trial runs all its epochs),
on the same real problem: a small timm network (--arch, test_efficientnet: 0.1M parameters, to
keep a run cheap on 2 cores) trained on the bundled digits with augmentation, in-process trials,
maximising validation accuracy, over a 5-dimensional space (lr, weight decay, batch size,
warmup, rotation). Equal budget: the same number of trials, each
allowed the same maximum epochs. Repeated over --seeds seeds (searcher, splits and init).

Per method and seed: the best val accuracy reached, the trial-epochs spent, and the
trial-epochs needed to first reach random search's final best (for random search itself: where
its own best was found). A trial-epoch is one epoch of one trial: the unit of compute.

Target: TPE + ASHA reaches random search's final best in every seed, using at most 1/3 of the
trial-epochs random search needed (summed over the seeds).

    python bench/hpo_efficiency.py [--quick] [--seeds 3] [--trials 24] [--epochs 4]
Writes OUT/hpo_efficiency.json and OUT/hpo_efficiency.png (best-so-far curves of both).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"TPE + ASHA": ("tpe", "asha"), "random + FIFO": ("random", "fifo")}
SPACE = {
    "teacher.lr": {"loguniform": [1e-5, 3e-1]},
    "teacher.weight_decay": {"loguniform": [1e-6, 1e-1]},
    "teacher.batch_size": {"choice": [32, 64, 128]},
    "teacher.warmup_fraction": {"uniform": [0.0, 0.5]},
    "data.augment.affine.degrees": {"uniform": [0.0, 30.0]},
}


def reach(curve: list, target: float) -> int | None:
    """Trial-epochs spent when the best-so-far first reached `target` (None: never)."""
    return next((int(x) for x, best in curve if best >= target - 1e-12), None)


def one_sweep(seed: int, searcher: str, scheduler: str, args, data, out: Path) -> dict:
    from raydistill.config import load_config
    from raydistill.sweep import run_sweep

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"seed={seed}", f"teacher.arch={args.arch}", f"sweep.searcher={searcher}", f"sweep.scheduler={scheduler}",
        f"sweep.num_trials={args.trials}", f"sweep.epochs={args.epochs}",
        f"sweep.reduction_factor={args.reduction_factor}", "sweep.mlflow=false",
        f"sweep.space={json.dumps(SPACE)}",
    ])
    start = time.perf_counter()
    summary, _ = run_sweep(cfg, data, out)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 trials of up to 3 epochs per sweep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24, help="trials per sweep (both methods)")
    parser.add_argument("--epochs", type=int, default=4, help="max epochs per trial (both methods)")
    parser.add_argument("--arch", default="test_efficientnet", help="timm architecture the trials train")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA's reduction factor")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"), help="folder for the JSON and the plot")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs = min(args.trials, 12), min(args.epochs, 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from raydistill.config import load_config
    from raydistill.data import load_dataset, resolve_source
    from raydistill.sweep import plot_progress

    work = Path(tempfile.mkdtemp(prefix="hpo_bench_"))
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    rows = []
    curves: dict[str, list] = {}
    try:
        for seed in range(args.seeds):
            cfg = load_config(REPO / "configs" / "demo.yaml", [f"seed={seed}"])
            data = load_dataset(cfg, resolve_source(cfg, work))
            found = {}
            for label, (searcher, scheduler) in METHODS.items():
                found[label] = one_sweep(seed, searcher, scheduler, args, data, work / f"s{seed}-{searcher}")
                curves[f"{label}, seed {seed}"] = found[label]["curve"]
            target = found["random + FIFO"]["curve"][-1][1]
            for label, summary in found.items():
                rows.append({
                    "seed": seed, "method": label, "best": summary["curve"][-1][1],
                    "trial_epochs": summary["trial_epochs"], "to_reach_random_best": reach(summary["curve"], target),
                    "wall_s": summary["wall_s"],
                })
    finally:
        ray.shutdown()

    print(f"\n{args.arch} on digits; {args.trials} trials x up to {args.epochs} epochs per sweep, {args.seeds} seeds, "
          f"metric val_accuracy (max); ASHA reduction factor {args.reduction_factor}\n")
    print(f"{'seed':>4}  {'method':14} {'best':>7} {'trial-epochs':>13} {'to reach random best':>21} {'wall s':>7}")
    for r in rows:
        reached = "never" if r["to_reach_random_best"] is None else str(r["to_reach_random_best"])
        print(f"{r['seed']:>4}  {r['method']:14} {r['best']:7.4f} {r['trial_epochs']:13d} {reached:>21} {r['wall_s']:7.1f}")

    ours = [r for r in rows if r["method"] == "TPE + ASHA"]
    base = [r for r in rows if r["method"] == "random + FIFO"]
    reached_all = all(r["to_reach_random_best"] is not None for r in ours)
    ours_sum = sum(r["to_reach_random_best"] or 0 for r in ours)
    base_sum = sum(r["to_reach_random_best"] for r in base)
    ratio = ours_sum / base_sum if reached_all and base_sum else None
    print(f"\ntrial-epochs to reach random search's final best, summed over seeds: TPE + ASHA "
          f"{ours_sum if reached_all else 'not reached in every seed'}, random + FIFO {base_sum}"
          + (f" (ratio {ratio:.2f}, target <= 0.33)" if ratio is not None else ""))

    plot = plot_progress(curves, out / "hpo_efficiency.png", "val_accuracy",
                         f"TPE + ASHA vs random + FIFO, {args.trials} trials x {args.epochs} epochs")
    result = {
        "bench": "hpo_efficiency",
        "target": "TPE + ASHA reaches random search's final best in every seed with <= 1/3 of the trial-epochs "
                  "random search needed (summed over seeds), at an equal budget of trials",
        "met": bool(ratio is not None and ratio <= 1 / 3),
        "ratio": None if ratio is None else round(ratio, 3),
        "arch": args.arch, "trials": args.trials, "epochs": args.epochs, "seeds": args.seeds, "reduction_factor": args.reduction_factor,
        "mean_best": {m: round(sum(r["best"] for r in rows if r["method"] == m) / args.seeds, 4) for m in METHODS},
        "trial_epochs_total": {m: sum(r["trial_epochs"] for r in rows if r["method"] == m) for m in METHODS},
        "rows": rows,
        "curves": curves,
        "plot": str(plot),
    }
    (out / "hpo_efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}))


if __name__ == "__main__":
    main()
