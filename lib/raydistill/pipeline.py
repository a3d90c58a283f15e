"""The stages, chained: data -> sweep -> teacher -> student -> deploy.

Each stage writes its folder and summary in the run directory and records its outputs'
hashes in manifest.json; a rerun with the same name skips every stage whose outputs are
still intact. A failing stage leaves the outputs of earlier stages as they were.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raydistill.artifacts import Run, read_json, write_json, write_text
from raydistill.config import Config, dump_yaml
from raydistill.console import log

if TYPE_CHECKING:  # serving imports Ray Serve: only the deploy stage pays for it
    from raydistill.serving import ServedModel

PIPELINE = ("sweep", "teacher", "student", "deploy")
DATA_SUMMARY = "data/summary.json"  # holds the source's fingerprint: an input of every stage that trains


def connect_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local
    Ray on this machine. Returns True when this process started Ray itself."""
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # Dashboard and Jobs API on loopback only: nothing is exposed to the network.
            ray.init(address="local", dashboard_host="127.0.0.1")
            started = True
    # Our per-epoch lines are the progress display; Ray Data's bars would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return started


def load_data(cfg: Config, run: Run):
    """The prepared data (the task's: data.Dataset for images, text.data.TextData for text).
    Prepared anew (read, checked, split and stored by Ray Data tasks under data/) when the data
    stage is not done: its config changed, the data at the source did (data.fingerprint), or
    its stored splits are gone. The summary holds the fingerprint and is an input of every
    stage that trains, so those are redone too."""
    from raydistill.data import DataError
    from raydistill.fingerprint import fingerprint
    from raydistill.tasks import task_of

    task = task_of(cfg)
    data_dir = run.dir("data")
    stored = data_dir / task.stored
    source = task.resolve_source(cfg, data_dir)
    seen = fingerprint(source, full=cfg.data.fingerprint == "full")
    digest = f"{cfg.stage_digest('data')}-{seen['sha256'][:16]}"
    unlabelled = task.resolve_unlabelled(cfg, data_dir)
    if unlabelled:  # its texts change what the student learns, as the source's do
        seen = {**seen, "unlabelled": fingerprint(unlabelled, full=cfg.data.fingerprint == "full")}
        digest += f"-{seen['unlabelled']['sha256'][:16]}"
    data = None
    if run.is_done("data", digest):
        with contextlib.suppress(DataError, FileNotFoundError):
            data = task.load(stored)
    if data is None:
        with run.stage("data", digest, config=cfg.stage_config("data")) as outputs:
            data = task.prepare(cfg, source, stored)
            summary = {**data.summary(cfg.data.augment), "source_fingerprint": seen}
            outputs.extend([write_json(data_dir / "summary.json", summary), stored / task.index])
    log(task.describe(data))
    return data


def _run_or_reuse(run: Run, cfg: Config, stage: str, produce, inputs: list[Path] = ()) -> dict:
    """A stage's summary: reused when it finished earlier with the same config sections and
    untouched inputs and outputs, else produced now. `produce(out_dir)` returns
    (summary, [files it wrote])."""
    out, digest = run.dir(stage), cfg.stage_digest(stage)
    if run.is_done(stage, digest):
        log(f"{stage}: done earlier with this config (outputs verified by sha256); skipped")
        return read_json(out / "summary.json")
    with run.stage(stage, digest, inputs, config=cfg.stage_config(stage)) as outputs:
        summary, files = produce(out)
        outputs += [*files, write_json(out / "summary.json", summary)]
    return summary


def stage_sweep(cfg: Config, data, run: Run, resume: bool = False) -> Config:
    """Returns the config the teacher trains with (best values applied). With `resume`, an
    interrupted sweep continues where its driver stopped."""
    from raydistill.sweep import run_sweep

    if cfg.sweep.num_trials == 0:
        log("sweep: skipped (sweep.num_trials=0); the teacher trains with its configured settings")
        return cfg

    def produce(out: Path):
        summary, best_cfg = run_sweep(cfg, data, out, resume=resume, run_name=run.name)
        best_yaml = out / "best.yaml"
        write_text(best_yaml, dump_yaml(best_cfg))
        return summary, [best_yaml, out / summary["plot"]]

    summary = _run_or_reuse(run, cfg, "sweep", produce, inputs=[run.root / DATA_SUMMARY])
    log(f"sweep: best {summary['best_metric']:.4f} {summary['metric']} with {summary['best_config']} "
        f"({summary['trial_epochs']} trial-epochs over {len(summary['trials'])} trials)")
    return cfg.with_values(summary["best_config"])


def stage_teacher(cfg: Config, data, run: Run) -> dict:
    from raydistill.tasks import task_of

    run_teacher = task_of(cfg).run_teacher
    summary = _run_or_reuse(
        run, cfg, "teacher",
        lambda out: (run_teacher(cfg, data, out), [out / "teacher.safetensors"]),
        inputs=[run.root / DATA_SUMMARY],
    )
    log(f"teacher: {summary['arch']} {summary['params_total']:,} params, ZeRO-{summary['zero_stage']} "
        f"per-rank {summary['params_per_rank']}, {_test_score(summary, 'test_exact_match')}")
    return summary


def stage_student(cfg: Config, data, run: Run) -> dict:
    from raydistill.tasks import task_of

    run_student = task_of(cfg).run_student
    teacher_path = run.root / "teacher" / "teacher.safetensors"
    teacher_sha = _verify(run, "teacher", teacher_path)
    teacher_accuracy = read_json(run.root / "teacher" / "summary.json")["accuracy"]
    summary = _run_or_reuse(
        run, cfg, "student",
        lambda out: run_student(cfg, data, teacher_path, teacher_accuracy, out, teacher_sha),
        inputs=[teacher_path, run.root / DATA_SUMMARY],
    )
    lat = summary["latency_ms_p50"]
    int8 = (f", int8 ONNX {summary['int8_accuracy']:.4f} at {summary['latency_ms_p50_exported']['student_int8']:.2f} ms"
            if summary.get("int8_accuracy") is not None else "")
    log(f"student: {summary['arch']} {summary['params_total']:,} params ({summary['params_ratio']:.1f}x fewer; "
        f"pruning {summary['pruning']['status']}), {_test_score(summary, 'exact_match')}, "
        f"retention {summary['retention']:.3f}, batch-1 p50 {lat['student']:.2f} ms vs teacher "
        f"{lat['teacher']:.2f} ms{int8}" + (f"; report in {report}" if (report := run.root / "student" / "report.md").exists()
                                             else ""))
    return summary


def _test_score(summary: dict, exact_match_key: str) -> str:
    """'test accuracy A', or for question answering (where `accuracy` holds the F1) 'test F1 F
    (exact match E)'."""
    if exact_match_key in summary:
        return f"test F1 {summary['accuracy']:.4f} (exact match {summary[exact_match_key]:.4f})"
    return f"test accuracy {summary['accuracy']:.4f}"


def _verify(run: Run, stage: str, path: Path) -> str:
    """The recorded sha256 of an earlier stage's output (refuses a missing or changed file)."""
    from raydistill.artifacts import ArtifactError, sha256

    rel = str(path.relative_to(run.root))
    recorded = run.output_hash(stage, rel)
    if recorded is None or not path.exists():
        raise ArtifactError(f"{path}: not found in this run; run the {stage} stage first")
    if sha256(path) != recorded:
        raise ArtifactError(f"{path}: sha256 differs from manifest.json (file changed or truncated)")
    return recorded


class QualityGateError(RuntimeError):
    """A trained model no better than guessing: the run stops before deploying it."""


ADVICE = {
    "teacher": "train longer (teacher.epochs), start from published weights (teacher.pretrained), leave "
               "teacher.arch, epochs and batch sizes unset so they fit the data, or check the labels",
    "student": "a wider or deeper student (student.width, student.depth, student.arch), more student.epochs, "
               "or a better teacher",
}


def quality_gate(stage: str, summary: dict, dcfg, deploying: bool) -> None:
    """Refuse to deploy a model whose validation accuracy does not beat the majority-class
    baseline by deploy.min_gain_over_majority (deploy.force overrides; without a deploy stage
    the log warns)."""
    accuracy, baseline = summary.get("val_accuracy"), summary.get("majority_val_accuracy")
    if accuracy is None or baseline is None or accuracy >= baseline + dcfg.min_gain_over_majority:
        return
    verdict = (f"{stage}: validation accuracy {accuracy:.4f} does not beat the majority-class baseline "
               f"{baseline:.4f} (always answering the most frequent class) by deploy.min_gain_over_majority="
               f"{dcfg.min_gain_over_majority}. Try {ADVICE[stage]}.")
    if not deploying:
        log(f"warning: {verdict}")
    elif dcfg.force:
        log(f"warning: {verdict} Deploying anyway (deploy.force=true).")
    else:
        raise QualityGateError(f"{verdict} The run stops before deploying; its outputs so far are kept. "
                               "Set deploy.force=true to deploy anyway.")


def stage_deploy(cfg: Config, run: Run) -> dict:
    from ray import serve

    from raydistill.serving import ServedModel, build_app, read_api_key

    out = run.dir("deploy")
    dcfg = cfg.deploy
    weights = run.root / "student" / "student.safetensors"
    runtime, onnx, reason = serving_runtime(run, dcfg)
    log(f"deploy: runtime {runtime} ({reason})")
    with run.stage("deploy", cfg.stage_digest("deploy"), inputs=[weights, *([onnx] if onnx else [])],
                   config=cfg.stage_config("deploy")) as outputs:
        digest = _verify(run, "student", weights)
        tokenizer = run.root / "data" / "text" / "tokenizer"
        model = ServedModel(str(weights), digest, *((str(onnx), _verify(run, "student", onnx)) if onnx else (None, None)),
                            str(tokenizer) if cfg.is_text else None)
        version = digest[:12]
        read_api_key(dcfg)  # checked again: the key may have gone since the run started
        serve.start(http_options={"host": dcfg.host, "port": dcfg.port})
        serve.run(build_app(model, dcfg, version), name=dcfg.model_name, route_prefix="/")
        host = "127.0.0.1" if dcfg.host in ("0.0.0.0", "::") else dcfg.host
        url = f"http://{host}:{dcfg.port}"
        _wait_ready(url)
        summary = {"url": url, "model": dcfg.model_name, "version": version, "replicas": dcfg.num_replicas,
                   "runtime": runtime, "runtime_reason": reason, "weights": str(weights), "onnx": model.onnx}
        outputs.append(write_json(out / "summary.json", summary))
        outputs.append(_write_serve_config(out / "serve_config.yaml", model, cfg, version))
    return summary


def serving_runtime(run: Run, dcfg) -> tuple[str, Path | None, str]:
    """What the replicas run (deploy.runtime, `auto` resolved), the ONNX file it needs if any,
    and why."""
    from raydistill.artifacts import ArtifactError

    written = run.good_outputs("student")
    files = {"int8": "student/student.int8.onnx", "onnx": "student/student.onnx"}
    runtime, reason = dcfg.runtime, "deploy.runtime"
    if runtime == "auto":
        runtime, reason = _auto_runtime(run, dcfg, files["int8"] in written)
    if runtime == "torch":
        return runtime, None, reason
    if files[runtime] not in written:
        hint = " (student.quantize=false)" if runtime == "int8" else ""
        raise ArtifactError(f"deploy.runtime={runtime} needs {files[runtime]}, which the student stage "
                            f"did not write{hint}")
    return runtime, run.root / files[runtime], reason


def _auto_runtime(run: Run, dcfg, int8_written: bool) -> tuple[str, str]:
    """GPU replicas run torch. On CPU, the int8 student if it kept its accuracy on validation
    (static int8 can lose a point or more on a small net), else the fp32 ONNX: it matches torch
    within student.onnx_tolerance and runs faster on CPU (demo student, batch 1: 0.09 ms, torch 0.96)."""
    if dcfg.use_gpu:
        return "torch", "auto: GPU replicas run torch"
    if not int8_written:
        return "onnx", "auto: no int8 student (student.quantize=false)"
    student = read_json(run.root / "student" / "summary.json")
    fp32, int8 = student.get("val_accuracy"), student.get("int8_val_accuracy")
    if fp32 is None or int8 is None:
        return "onnx", "auto: the student summary records no validation accuracy for int8"
    verdict = "within" if int8 >= fp32 - dcfg.int8_max_drop else "more than"
    why = f"auto: int8 val accuracy {int8:.4f}, {verdict} deploy.int8_max_drop={dcfg.int8_max_drop} of fp32's {fp32:.4f}"
    return ("int8" if verdict == "within" else "onnx"), why


def _wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"deploy: {url}/v2/health/ready did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def _shipped_code() -> dict:
    """The runtime_env that gives replicas this run's code: inside a job, the package the job
    shipped (runtime_env.yaml's py_modules, uploaded as a gcs:// URI that the cluster keeps
    while a job or app uses it); outside one, none: every node imports its installed raydistill."""
    import ray

    if not ray.is_initialized():
        return {}
    env = ray.get_runtime_context().runtime_env or {}
    shipped = [m for m in env.get("py_modules") or [] if isinstance(m, str) and "://" in m]
    return {"py_modules": shipped} if shipped else {}


def _write_serve_config(path: Path, model: ServedModel, cfg: Config, version: str) -> Path:
    """A config for `serve deploy` that serves the same student on a running cluster, from any
    directory: the builder is in the package (raydistill.serving:app)."""
    dcfg = cfg.deploy
    application = {
        "name": dcfg.model_name,
        "route_prefix": "/",
        "import_path": "raydistill.serving:app",
        "args": {**model._asdict(), "version": version, "deploy": dcfg.model_dump(mode="json")},
    }
    if shipped := _shipped_code():
        application["runtime_env"] = shipped
    config = {"http_options": {"host": dcfg.host, "port": dcfg.port}, "applications": [application]}
    return write_text(path, yaml.safe_dump(config, sort_keys=False))


def serve_forever(summary: dict) -> None:
    """Like `serve run`: keep serving in the foreground until Ctrl-C."""
    import signal

    # Ray Train leaves its own SIGINT handler installed after fit(); Ctrl-C must stop us here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    url, name = summary["url"], summary["model"]
    log(f"serving '{name}' version {summary['version']} at {url}  (Ctrl-C to stop)")
    print(f"  curl {url}/v2/health/ready\n"
          f"  curl {url}/v2/models/{name}\n"
          f"  raydistill query --url {url} path/to/digit.png\n"
          f"  open {url}/docs", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")


def prepare(cfg: Config, run: Run, stages: tuple[str, ...]) -> tuple[Config, object]:
    """Refuse bad input before any training: the data, what earlier stages left, and the
    sweep's and teacher's settings against the data. Returns the config with the recipe keys
    it leaves unset fitted to the data (recipe.fit_to_data), and the data (None when no stage
    needs it). The caller holds the run's lock, has started its record and is connected to Ray."""
    data = load_data(cfg, run) if {"sweep", "teacher", "student"} & set(stages) else None
    if data is not None and not cfg.is_text:  # the fitted recipe is the image one
        from raydistill.recipe import fit_to_data

        cfg, chosen = fit_to_data(cfg, len(data.train), data.input_shape[0])
        for key, why in chosen.items():
            log(f"recipe: {key} = {why}")
    for stage, needs, path in (("student", "teacher", "teacher/teacher.safetensors"),
                               ("deploy", "student", "student/student.safetensors")):
        if stage in stages and needs not in stages:
            _verify(run, needs, run.root / path)
    if "sweep" in stages and cfg.sweep.num_trials:
        from raydistill.sweep import check_sweep

        check_sweep(cfg, data)
    if "teacher" in stages:
        from raydistill.tasks import task_of

        task_of(cfg).check_teacher(cfg, data)
    return cfg, data


def check_before_ray(cfg: Config, stages: tuple[str, ...]) -> None:
    """What can be refused from the config alone, before Ray starts or data is read."""
    if "sweep" in stages:
        from raydistill.sweep import check_swept_keys

        check_swept_keys(cfg)
    if "teacher" in stages:
        from raydistill.tasks import task_of

        task_of(cfg).check_teacher(cfg)
    if "deploy" in stages:
        from raydistill.serving import read_api_key

        read_api_key(cfg.deploy)  # a configured but unreadable key fails now, not after training


@contextlib.contextmanager
def opened(cfg: Config, storage: str, name: str, stages: tuple[str, ...]):
    """Hold the run (its lock), join or start Ray, refuse bad input: yields (run, the config
    fitted to the data, data, whether Ray was started here). The caller decides what to do
    with a Ray it started; one started here for input that is then refused is shut down here."""
    import ray

    check_before_ray(cfg, stages)
    run = Run(storage, name)
    with run.lock():
        run.start(cfg.model_dump(mode="json"), cfg.digest())
        log(f"run '{run.name}' in {run.root}")
        started = connect_ray()  # the data stage reads and checks rows in Ray Data tasks
        try:
            cfg, data = prepare(cfg, run, stages)
        except BaseException:
            if started:
                ray.shutdown()
            raise
        yield run, cfg, data, started


def execute(cfg: Config, run: Run, data, stages: tuple[str, ...], resume: bool = False) -> dict:
    """Run the stages in order on the Ray this process is connected to; returns their
    summaries. Neither starts, blocks on nor shuts down Ray."""
    summaries: dict = {}
    deploying = "deploy" in stages
    if "sweep" in stages:
        cfg = stage_sweep(cfg, data, run, resume)
    if "teacher" in stages:
        summaries["teacher"] = stage_teacher(cfg, data, run)
        quality_gate("teacher", summaries["teacher"], cfg.deploy, deploying)
    if "student" in stages:
        summaries["student"] = stage_student(cfg, data, run)
        quality_gate("student", summaries["student"], cfg.deploy, deploying)
    if "deploy" in stages:
        summaries["deploy"] = stage_deploy(cfg, run)
    return summaries


def run_stages(cfg: Config, storage: str, name: str, stages: tuple[str, ...] = PIPELINE,
               resume: bool = False) -> dict:
    """The CLI's path: run the given stages on Ray (joined or started here), then serve in the
    foreground when deploy.foreground says so. Returns the summaries. `resume` continues an
    interrupted sweep (the teacher resumes from its checkpoints anyway)."""
    import ray

    start = time.perf_counter()
    with opened(cfg, storage, name, stages) as (run, cfg, data, started):
        try:
            summaries = execute(cfg, run, data, stages, resume)
            if "deploy" in stages:
                log(f"deployment ready at {summaries['deploy']['url']} "
                    f"({time.perf_counter() - start:.0f}s from start)")
                if cfg.deploy.foreground == "always" or (cfg.deploy.foreground == "auto" and started):
                    serve_forever(summaries["deploy"])
        finally:
            if started:
                ray.shutdown()
    return summaries
