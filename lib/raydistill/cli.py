"""`raydistill`: run the pipeline or one stage, query a deployment, show a run's status.

Exit codes: 0 ok, 1 a stage failed (bad data, a broken artifact, a failed worker),
2 a bad config or command line, 130 interrupted (Ctrl-C, or SIGTERM from `ray job stop` or
Kubernetes: the running stage is recorded as interrupted, and a rerun resumes it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

STAGE_COMMANDS = {
    "run": ("sweep", "teacher", "student", "deploy"),
    "sweep": ("sweep",),
    "train": ("teacher",),
    "distill": ("student",),
    "deploy": ("deploy",),
}
HELP = {
    "run": "all stages: augment -> sweep -> teacher (DeepSpeed ZeRO) -> distill -> serve",
    "sweep": "Bayesian search + early stopping (Ray Tune); writes sweep/summary.json, best.yaml, progress.png",
    "train": "train the sharded teacher; writes teacher/teacher.safetensors",
    "distill": "distill the teacher into the student; writes student/student.safetensors",
    "deploy": "serve the run's student with Ray Serve (Open Inference Protocol v2 + /predict)",
}
EPILOG = """examples:
  raydistill run --config configs/demo.yaml
  raydistill run --config configs/demo.yaml --set teacher.epochs=8 --set sweep.num_trials=8
  raydistill train --config runs/demo/sweep/best.yaml --name demo
  raydistill query --url http://127.0.0.1:8000 digit.png more_digits/
  raydistill query --text "Compute the eigenvalues of a sparse matrix."   (a text model)
  raydistill query --question "Which parameter: axis to sort along?" --context "$(cat params.txt)"   (a QA model)
  raydistill status demo
  raydistill status --json demo | jq .stages.teacher.summary.accuracy
  raydistill data preview --config configs/demo.yaml --out grid.png

On a cluster: RAY_ADDRESS=... (or `ray job submit ... -- python jobs/pipeline.py ...`)."""


def _stage_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help=HELP[name], description=HELP[name],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML preset, e.g. configs/demo.yaml (defaults when omitted)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set teacher.epochs=3 (repeatable)")
    p.add_argument("--storage", default="./runs", help="directory holding runs (default ./runs)")
    p.add_argument("--name", help="run name; a rerun with the same name resumes (default: preset name)")
    if name in ("run", "sweep"):
        p.add_argument("--resume", action="store_true",
                       help="continue this run's interrupted sweep (finished trials are kept, not rerun)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill", description="Labelled images -> small, fast model served over HTTP, on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from raydistill import __version__

    parser.add_argument("--version", action="version", version=f"raydistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_COMMANDS:
        _stage_parser(sub, name)
    q = sub.add_parser("query", help="send images (or texts) to a deployment and print predictions as a table")
    q.add_argument("--url", default="http://127.0.0.1:8000", help="deployment URL (default %(default)s)")
    q.add_argument("--api-key-file", metavar="FILE",
                   help="file holding the deployment's API key (default: $RAYDISTILL_API_KEY, if set)")
    q.add_argument("paths", nargs="*", metavar="IMAGE_OR_DIR", help="PNG/JPEG files or folders of them")
    q.add_argument("--text", dest="texts", action="append", metavar="TEXT",
                   help="a text to classify, for a text model (repeatable; instead of images)")
    q.add_argument("--question", help="a question, for a question answering model (with --context)")
    q.add_argument("--context", help="the text that holds the answer to --question")
    d = sub.add_parser("data", help="look at the data stage: `data preview` saves augmented samples as a PNG grid")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    pv = dsub.add_parser("preview", help="save a PNG grid of augmented training samples with their labels")
    pv.add_argument("--config", "-c", help="YAML preset (defaults when omitted)")
    pv.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key, e.g. --set data.augment.affine.degrees=30 (repeatable)")
    pv.add_argument("--out", required=True, help="PNG file to write, e.g. grid.png")
    pv.add_argument("--count", type=int, default=32, help="samples in the grid (default %(default)s)")
    s = sub.add_parser("status", help="stage table of a run, from its manifest.json")
    s.add_argument("--storage", default="./runs", help="directory holding runs (default ./runs)")
    s.add_argument("--json", action="store_true",
                   help="print the manifest's stage records and each stage's summary as one JSON object")
    s.add_argument("name")
    return parser


def _run_stages(args) -> int:
    from raydistill.config import load_config
    from raydistill.pipeline import run_stages

    cfg = load_config(args.config, args.sets)
    name = args.name or (Path(args.config).stem if args.config else "default")
    run_stages(cfg, args.storage, name, STAGE_COMMANDS[args.command], resume=getattr(args, "resume", False))
    return 0


def _data_preview(args) -> int:
    from raydistill.config import ConfigError, load_config
    from raydistill.augment import write_preview

    if args.count < 1:
        raise ConfigError(f"--count {args.count}: give at least 1")
    cfg = load_config(args.config, args.sets)
    out = write_preview(cfg, args.out, args.count)
    print(f"raydistill: wrote {out} ({args.count} augmented samples, epoch 0, seed {cfg.seed})")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    from raydistill.artifacts import ArtifactError
    from raydistill.config import ConfigError
    from raydistill.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # `ray job stop` and Kubernetes send SIGTERM: stop as on Ctrl-C, so the running stage
        # is recorded as interrupted (not left "running"). ray.init replaces this handler with
        # one raising SystemExit, which Run.stage records the same way.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "query":
            from raydistill.client import query

            if args.question is not None or args.context is not None:
                if not (args.question and args.context) or args.paths or args.texts:
                    parser.error("query: --question and --context go together, without images or --text")
                from raydistill.client import ask

                return ask(args.url, args.question, args.context, args.api_key_file)
            if bool(args.paths) == bool(args.texts):
                parser.error("query: give image files or folders, or --text TEXT, but not both")
            return query(args.url, args.paths, args.api_key_file, args.texts)
        if args.command == "data":
            return _data_preview(args)
        if args.command == "status":
            from raydistill.status import status

            return status(args.storage, args.name, as_json=args.json)
        return _run_stages(args)
    except ConfigError as err:
        print(f"raydistill: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, ArtifactError, ValueError, RuntimeError, OSError) as err:
        print(f"raydistill: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raydistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
