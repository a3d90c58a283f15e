import subprocess
import sys

import pytest

from raydistill.config import ConfigError, load_config

from conftest import REPO


def test_presets_load_and_demo_sizes_fit_two_cores():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.data.source == "digits"
    assert cfg.teacher.zero_stage == 3 and cfg.teacher.num_workers == 2
    # 2 trainers plus augmentation tasks must fit on 2 CPUs or Ray Data would wait forever.
    assert cfg.teacher.num_workers * cfg.teacher.cpus_per_worker + cfg.data.cpus_per_task <= 2


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_is_a_valid_config(preset):
    cfg = load_config(REPO / "configs" / preset)
    if "gpu" in preset:  # the GPU presets train and distil on GPUs, in bf16 where they shard
        assert cfg.teacher.use_gpu and cfg.student.use_gpu
    if cfg.teacher.use_gpu and cfg.teacher.zero_stage:
        assert cfg.teacher.precision == "bf16"


def test_set_overrides_typed_values():
    cfg = load_config(None, ["teacher.epochs=7", "sweep.searcher=gp", "data.augment.gaussian_noise.std=0.1", "seed=3"])
    assert (cfg.teacher.epochs, cfg.sweep.searcher, cfg.data.augment[2].std, cfg.seed) == (7, "gp", 0.1, 3)


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["teacher.epoch=3"], "unknown key 'teacher.epoch': allowed here: arch, num_workers"),
        (["bogus.x=1"], "unknown key 'bogus'"),
        (["teacher.zero_stage=5"], "bad value for 'teacher.zero_stage'"),
        (["sweep.searcher=bayes"], "bad value for 'sweep.searcher'"),
        (["sweep.space={teacher.lr: {loguniform: [0.1, 0.01]}}"], "'sweep.space.teacher.lr': loguniform: the range [0.1, 0.01] is inverted"),
        (["teacher=3"], "bad value for 'teacher': expected a section"),
        (["novalue"], "expected key.path=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(sets, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  arch: resnet18\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'teacher.lr_rate'"):
        load_config(path)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_exits_2_with_one_line_before_anything_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "raydistill.cli", "run", "--config", str(REPO / "configs" / "demo.yaml"),
         "--set", "teacher.zero_stage=4", "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "teacher.zero_stage" in lines[0]
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"


def test_python_dash_m_is_the_cli_and_reports_the_package_version():
    import raydistill

    version = subprocess.run([sys.executable, "-m", "raydistill", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"raydistill {raydistill.__version__}"
    usage = subprocess.run([sys.executable, "-m", "raydistill", "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0
    for command in ("run", "sweep", "train", "distill", "deploy", "query", "status", "data"):
        assert command in usage.stdout
    wrong = subprocess.run([sys.executable, "-m", "raydistill", "trian"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "invalid choice: 'trian'" in wrong.stderr


def test_stage_digests_ignore_unrelated_sections():
    a = load_config(None)
    b = load_config(None, ["deploy.port=9000"])
    assert a.stage_digest("teacher") == b.stage_digest("teacher")
    assert a.stage_digest("deploy") != b.stage_digest("deploy")
    assert a.stage_digest("student") != load_config(None, ["student.alpha=0.9"]).stage_digest("student")
