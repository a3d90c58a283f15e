"""HPO efficiency: Bayesian search + early stopping against random search, at an equal budget.

Compared, in one run, with the project's own sweep (raydistill.sweep.run_sweep):
  - ours:     Optuna TPE + ASHA, the sweep's defaults (multivariate TPE with constant liar,
              num_trials // 6 random startup trials; ASHA grace period 1, reduction factor 2),
  - baseline: random search + FIFO (every trial runs all its epochs),
on the same real training problem: a small timm network (--arch, test_efficientnet: 0.1M
parameters, to keep a run cheap on 2 cores), in-process trials with the pipeline's augmentation,
on the bundled digits (1,797 real 8x8 images, through the pipeline's own data stage, which
splits by a seeded hash of each row's key), with about 30% of the rows (~539) for validation,
5% held out, 65% (~1,168) to train. The metric is validation
cross-entropy (val_loss, min): it is continuous and keeps ranking models once accuracy
saturates, where val accuracy on a few hundred rows moves in steps of one image and ties
decide which method "reached" the other's best. (--data shapes trains on the set
bench/compression.py generates, at 3x16x16; at this budget test_efficientnet does not learn
it, every trial stays near chance, so it is not the default.) The 5-dimensional space is wide,
as a real first sweep's is: lr over 4.5 decades, weight decay over 5, batch size, warmup,
rotation.
Equal budget (--budget):
  - trial-epochs (default): equal compute. Random search + FIFO runs --trials trials of --epochs
    epochs, which spends trials x epochs trial-epochs; TPE + ASHA gets the same number of
    trial-epochs (sweep.trial_epoch_budget) and starts trials until it has spent them, so the
    epochs ASHA saves by stopping trials early go to more trials, as in the Hyperband and ASHA
    papers' comparisons at equal resources. Its random startup stays at trials // 6.
  - trials: the same number of trials, each allowed the same maximum epochs (ASHA's savings
    are then left unspent).
Both run 2 trials at a time (--concurrent). Repeated over --seeds seeds (searcher, splits and init).

Trials run up to --epochs 27 epochs. Early stopping can only save what a trial has left to
run, and real sweeps train for tens of epochs: with the sweep's default ASHA (grace period 1,
reduction factor 2; rungs at 1, 2, 4, 8, 16) a 27-epoch trial that ASHA stops at the first
rung costs 1/27 of a full one. A full run takes about 45 minutes on 2 cores; --quick runs 12
trials of up to 3 epochs per sweep.

Definitions (identical for both methods, from the same progress curve, raydistill.sweep.progress_curve):
  - a trial-epoch is one epoch of one trial: the unit of compute;
  - the curve orders every per-epoch report of every trial by arrival and keeps the best metric
    so far; x is the number of reports so far, i.e. trial-epochs spent;
  - "to reach" T is the x of the first report whose best-so-far is at least as good as T; T is
    random search's final best in the same seed (so for random search it is where it first
    found its own best).
Random search's trials are independent draws, so the order they ran in is luck: its final best
may come in its first trial or its last, and that alone can move one seed's "to reach" by an
order of magnitude. The criterion takes random search's "to reach" as the mean over 2,000
random orders of its own trials, replayed --concurrent at a time (expected_reach_iid): the
same expectation, with the luck of one order averaged out. TPE + ASHA keeps the order it ran
in (each of its trials depends on the ones before). The figure for the order random search
actually ran in is printed and recorded too ("as_ran").
Target: TPE + ASHA reaches T in every seed, and the sum over seeds of its trial-epochs to reach
T is at most 1/3 of random search's sum. Per-seed ratios and their median are printed too, and,
as a second view of the same curves, each method's best at the trial-epochs TPE + ASHA spent.

    python bench/hpo_efficiency.py [--quick] [--seeds 3] [--trials 24] [--epochs 27] [--budget trial-epochs|trials]
                                   [--data shapes|digits] [--workdir runs/bench]
Writes WORKDIR/hpo_efficiency.png (best-so-far curves of both) and, after each seed,
WORKDIR/hpo_efficiency.partial.json (rows and curves so far).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import Bench

REPO = Path(__file__).resolve().parents[1]
METHODS = {"TPE + ASHA": ("tpe", "asha"), "random + FIFO": ("random", "fifo")}
SPACE = {
    "teacher.lr": {"loguniform": [1e-5, 3e-1]},
    "teacher.weight_decay": {"loguniform": [1e-6, 1e-1]},
    "teacher.batch_size": {"choice": [32, 64, 128]},
    "teacher.warmup_fraction": {"uniform": [0.0, 0.5]},
    "data.augment.affine.degrees": {"uniform": [0.0, 30.0]},
}
VAL_FRACTION, TEST_FRACTION = 0.3, 0.05


def reach(curve: list, target: float, mode: str) -> int | None:
    """Trial-epochs spent when the best-so-far first reached `target` (None: never)."""
    sign = 1 if mode == "max" else -1
    return next((int(x) for x, best in curve if sign * (best - target) >= -1e-12), None)


def replay_reach(histories: list, order, target: float, mode: str, concurrent: int) -> int | None:
    """Trial-epochs until some report reaches `target` when the trials with these per-epoch
    `histories` run in `order`, `concurrent` at a time, every epoch taking the same time: the
    bench's own arrival model, replayed for an order the trials did not actually run in."""
    sign = 1 if mode == "max" else -1
    queue, slots, spent = list(order), [], 0
    while queue or slots:
        while queue and len(slots) < concurrent:
            slots.append([histories[queue.pop(0)], 0])
        for slot in slots:
            spent += 1
            if sign * (slot[0][slot[1]] - target) >= -1e-12:
                return spent
            slot[1] += 1
        slots = [s for s in slots if s[1] < len(s[0])]
    return None


def expected_reach_iid(histories: list, target: float, mode: str, concurrent: int, orders: int = 2000) -> float | None:
    """Random search's trial-epochs to reach `target`, averaged over `orders` random orders of
    its own trials. Its trials are independent draws, so the order they happened to run in is
    luck: its best may come first or last. Averaging over orders keeps the same expectation with
    less of that noise (TPE's trials depend on the ones before them, so its order is its own
    and it keeps the one it ran in)."""
    import numpy as np

    histories = [h for h in histories if h]  # a trial that failed before its first report cost nothing
    rng = np.random.default_rng(0)
    reached = [replay_reach(histories, rng.permutation(len(histories)).tolist(), target, mode, concurrent)
               for _ in range(orders)]
    return None if None in reached else float(np.mean(reached))


def best_at(curve: list, spent: int) -> float | None:
    """Best-so-far after `spent` trial-epochs (the curve's last value if it ended before)."""
    seen = [best for x, best in curve if x <= spent]
    return seen[-1] if seen else None


def load_data(name: str, seed: int, n: int, work: Path):
    """The problem the trials train on: the shapes set of bench/compression.py (3x16x16), or
    the bundled digits, through the data stage (`data.prepare`: Ray Data tasks read, check and
    split the rows by a seeded hash, about 30% for validation; needs the running Ray); the
    data.Dataset of the stored splits."""
    from raydistill.config import load_config
    from raydistill.data import prepare, resolve_source

    if name == "digits":
        # The sweep never reads the test split: keep 5% there, 30% for validation.
        cfg = load_config(REPO / "configs" / "demo.yaml", [f"seed={seed}", f"data.val_fraction={VAL_FRACTION}",
                                                           f"data.test_fraction={TEST_FRACTION}"])
        return prepare(cfg, resolve_source(cfg, work), work / f"digits-s{seed}" / "splits")
    sys.path.insert(0, str(REPO / "bench"))
    from compression import shapes_dataset, split

    # One generated set for all seeds (generator seed fixed); the seed draws the split.
    return split(*shapes_dataset(n, seed=1, size=16), seed=seed, work=work / f"shapes-s{seed}",
                 test_fraction=TEST_FRACTION, val_fraction=VAL_FRACTION)


def one_sweep(seed: int, searcher: str, scheduler: str, args, data, out: Path) -> dict:
    from raydistill.config import SweepConfig, load_config
    from raydistill.sweep import run_sweep

    trials = [f"sweep.num_trials={args.trials}"]
    if args.budget == "trial-epochs" and scheduler != "fifo":
        # As many trials as the budget affords (each runs at least one epoch); startup as at --trials.
        budget = args.trials * args.epochs
        trials = [f"sweep.num_trials={budget}", f"sweep.trial_epoch_budget={budget}",
                  f"sweep.startup_trials={SweepConfig(num_trials=args.trials).resolved_startup_trials}"]
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"seed={seed}", f"teacher.arch={args.arch}", f"sweep.searcher={searcher}", f"sweep.scheduler={scheduler}",
        *trials, f"sweep.epochs={args.epochs}", f"sweep.metric={args.metric}",
        f"sweep.max_concurrent_trials={args.concurrent}", "sweep.mlflow=false", f"sweep.space={json.dumps(SPACE)}",
        *( [f"sweep.reduction_factor={args.reduction_factor}"] if args.reduction_factor else []),
    ])
    start = time.perf_counter()
    summary, _ = run_sweep(cfg, data, out)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["reduction_factor"] = cfg.sweep.reduction_factor
    summary["startup_trials"] = cfg.sweep.resolved_startup_trials
    return summary


def main() -> None:
    bench = Bench("hpo_efficiency", __doc__, repeats=None,
                  target="TPE + ASHA reaches random search's final best in every seed with <= 1/3 of the "
                         "trial-epochs random search needed (summed over seeds; random search's averaged over the "
                         "orders of its trials), at an equal budget")
    parser = bench.parser
    parser.add_argument("--seeds", type=int, default=3, help="seeds (searcher, splits and init); both methods each")
    parser.add_argument("--trials", type=int, default=24, help="trials per sweep (both methods)")
    parser.add_argument("--epochs", type=int, default=27, help="max epochs per trial (both methods)")
    parser.add_argument("--budget", choices=("trial-epochs", "trials"), default="trial-epochs",
                        help="what both methods get equal of: trial-epochs (trials x epochs; TPE + ASHA spends "
                             "ASHA's savings on more trials) or trials (the same --trials each)")
    parser.add_argument("--data", choices=("digits", "shapes"), default="digits",
                        help="shapes: bench/compression.py's set; test_efficientnet does not learn it in a few epochs")
    parser.add_argument("--shapes", type=int, default=2000, help="rows of the generated shapes set")
    parser.add_argument("--metric", choices=("val_loss", "val_accuracy"), default="val_loss")
    parser.add_argument("--arch", default="test_efficientnet", help="timm architecture the trials train")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once (both methods)")
    parser.add_argument("--reduction-factor", type=int, default=None, help="ASHA's; default: the sweep's default")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench",
                        help="folder for the plot and the per-seed partial results")
    args = bench.parse()
    bench.target += f" of {args.budget}"
    if args.quick:
        args.trials, args.epochs, args.shapes = min(args.trials, 12), min(args.epochs, 3), min(args.shapes, 1200)
    out = args.workdir
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from raydistill.config import TRIAL_METRICS
    from raydistill.sweep import plot_progress

    mode = TRIAL_METRICS[args.metric]
    work = Path(tempfile.mkdtemp(prefix="hpo_bench_"))
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, curves, settings = [], {}, {}
    try:
        for seed in range(args.seeds):
            data = load_data(args.data, seed, args.shapes, work)
            found = {}
            for label, (searcher, scheduler) in METHODS.items():
                found[label] = one_sweep(seed, searcher, scheduler, args, data, work / f"s{seed}-{searcher}")
                curves[f"{label}, seed {seed}"] = found[label]["curve"]
            settings = {"reduction_factor": found["TPE + ASHA"]["reduction_factor"],
                        "startup_trials": found["TPE + ASHA"]["startup_trials"],
                        "train_rows": len(data.train), "val_rows": len(data.val)}
            target = found["random + FIFO"]["curve"][-1][1]
            ours_spent = found["TPE + ASHA"]["trial_epochs"]
            for label, summary in found.items():
                ran = reach(summary["curve"], target, mode)
                rows.append({
                    "seed": seed, "method": label, "best": summary["curve"][-1][1],
                    "trial_epochs": summary["trial_epochs"], "to_reach_random_best": ran,
                    # the criterion's figure: random search's averaged over orders of its trials, TPE's as it ran
                    "to_reach_expected": ran if label == "TPE + ASHA" else expected_reach_iid(
                        [t["history"] for t in summary["trials"]], target, mode, args.concurrent),
                    "best_at_ours_spend": best_at(summary["curve"], ours_spent),
                    "stopped_early": sum(t["status"] == "stopped_early" for t in summary["trials"]),
                    "wall_s": summary["wall_s"],
                })
            # A long run on a busy machine: each finished seed is on disk and on screen at once.
            print(json.dumps({"seed_done": seed, "rows": rows[-len(found):]}), flush=True)
            (out / "hpo_efficiency.partial.json").write_text(json.dumps({"rows": rows, "curves": curves}) + "\n")
    finally:
        ray.shutdown()

    print(f"\n{args.arch} on {args.data} ({settings['train_rows']} train / {settings['val_rows']} val rows); "
          f"{args.trials} trials x up to {args.epochs} epochs per sweep, equal {args.budget}, {args.concurrent} at once, "
          f"{args.seeds} seeds; "
          f"metric {args.metric} ({mode}); TPE startup {settings['startup_trials']} trials, ASHA reduction factor "
          f"{settings['reduction_factor']}\n")
    print(f"{'seed':>4}  {'method':14} {'best':>7} {'trial-epochs':>13} {'to reach random best':>21} "
          f"{'(mean over orders)':>19} {'best at ours spend':>19} {'wall s':>7}")
    for r in rows:
        reached = "never" if r["to_reach_random_best"] is None else str(r["to_reach_random_best"])
        expected = "" if r["method"] == "TPE + ASHA" else f"{r['to_reach_expected']:.1f}"
        print(f"{r['seed']:>4}  {r['method']:14} {r['best']:7.4f} {r['trial_epochs']:13d} {reached:>21} "
              f"{expected:>19} {r['best_at_ours_spend']:19.4f} {r['wall_s']:7.1f}")

    ours = [r for r in rows if r["method"] == "TPE + ASHA"]
    base = [r for r in rows if r["method"] == "random + FIFO"]
    reached_all = all(r["to_reach_random_best"] is not None for r in ours)
    ratios = {}  # the criterion (random search averaged over orders), and the same with the order it ran in
    for key in ("to_reach_expected", "to_reach_random_best"):
        ours_sum, base_sum = sum(r[key] or 0 for r in ours), sum(r[key] for r in base)
        per_seed = [o[key] / b[key] if o[key] is not None else None for o, b in zip(ours, base)]
        ratios[key] = {
            "ratio": round(ours_sum / base_sum, 3) if reached_all and base_sum else None,
            "per_seed": [None if r is None else round(r, 3) for r in per_seed],
            "median": statistics.median([float("inf") if r is None else round(r, 3) for r in per_seed]),
            "sums": [ours_sum if reached_all else None, round(base_sum, 1)],
        }
    for key, text in (("to_reach_expected", "random search averaged over the orders its trials could have run in"),
                      ("to_reach_random_best", "random search in the order it ran")):
        r = ratios[key]
        print(f"\ntrial-epochs to reach random search's final best, summed over seeds ({text}): TPE + ASHA "
              f"{r['sums'][0] if reached_all else 'not reached in every seed'}, random + FIFO {r['sums'][1]}"
              + (f" (ratio {r['ratio']:.2f}, target <= 0.33)" if r["ratio"] is not None else ""))
        print("per-seed ratios: " + ", ".join("never" if x is None else f"{x:.2f}" for x in r["per_seed"])
              + f"; median {r['median']:.2f}")
        r["median"] = None if r["median"] == float("inf") else r["median"]
    ratio = ratios["to_reach_expected"]["ratio"]

    plot = plot_progress(curves, out / "hpo_efficiency.png", args.metric,
                         f"TPE + ASHA vs random + FIFO on {args.data}, equal {args.budget} "
                         f"({args.trials} x {args.epochs})")
    sums = ratios["to_reach_expected"]["sums"]
    bench.finish(
        met=ratio is not None and ratio <= 1 / 3,
        figures={
            "ratio": ratio,
            "per_seed_ratio": ratios["to_reach_expected"]["per_seed"],
            "median_ratio": ratios["to_reach_expected"]["median"],
            "as_ran": ratios["to_reach_random_best"],
            "data": args.data, "metric": args.metric, "mode": mode, "arch": args.arch, "trials": args.trials,
            "epochs": args.epochs, "budget": args.budget, "seeds": args.seeds, "concurrent": args.concurrent,
            **settings,
            "mean_best": {m: sum(r["best"] for r in rows if r["method"] == m) / args.seeds for m in METHODS},
            "trial_epochs_total": {m: sum(r["trial_epochs"] for r in rows if r["method"] == m) for m in METHODS},
            "rows": {f"seed {r['seed']}, {r['method']}": {k: v for k, v in r.items() if k not in ("seed", "method")}
                     for r in rows},
            "plot": str(plot),
        },
        # Trial-epochs to reach random search's final best, summed over seeds (random search's
        # averaged over orders): only when TPE + ASHA reached it in every seed.
        compare={"ours: TPE + ASHA": sums[0], "random search + FIFO": sums[1]} if reached_all else None,
        unit="trial-epochs to reach random search's best (sum over seeds; fewer is better)",
        notes="" if reached_all else "TPE + ASHA did not reach random search's final best in every seed.",
    )


if __name__ == "__main__":
    main()
