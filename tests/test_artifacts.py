import pytest
import torch

from raydistill.artifacts import ArtifactError, Run, load_weights, save_weights, sha256, write_json
from raydistill.models import ModelSpec, build_network


@pytest.fixture
def weights(tmp_path):
    spec = ModelSpec("test_efficientnet", 10, (1, 8, 8), 16)
    net = build_network(spec)
    return save_weights(tmp_path / "w.safetensors", net.state_dict(), spec.to_meta()), net, spec


def test_weights_round_trip_with_spec(weights):
    path, net, spec = weights
    state, meta = load_weights(path, sha256(path))
    assert ModelSpec.from_meta(meta) == spec
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value)


def test_changed_or_truncated_weights_are_refused(weights):
    path, _, _ = weights
    digest = sha256(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_weights(path, digest)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_weights(path)
    path.write_bytes(b"\x80\x04pickle?")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_weights(path)


def test_failed_stage_keeps_earlier_outputs(tmp_path):
    run = Run(tmp_path, "r")
    with run.stage("data", "h1") as outputs:
        outputs.append(write_json(run.dir("data") / "summary.json", {"rows_read": 3}))
    before = sha256(run.root / "data" / "summary.json")
    with pytest.raises(RuntimeError, match="boom"):
        with run.stage("sweep", "h2"):
            raise RuntimeError("boom")
    stages = run.manifest()["stages"]
    assert stages["data"]["status"] == "done" and stages["sweep"]["status"] == "failed"
    assert "boom" in stages["sweep"]["error"]
    assert sha256(run.root / "data" / "summary.json") == before
    assert run.is_done("data", "h1") and not run.is_done("sweep", "h2")


def test_done_stage_reruns_when_output_changed_or_config_differs(tmp_path):
    run = Run(tmp_path, "r")
    with run.stage("teacher", "h") as outputs:
        outputs.append(write_json(run.dir("teacher") / "summary.json", {"accuracy": 0.9}))
    assert run.is_done("teacher", "h")
    assert not run.is_done("teacher", "other-config")
    (run.root / "teacher" / "summary.json").write_text("{}")
    assert not run.is_done("teacher", "h")


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt(), "interrupted"), (SystemExit(15), "interrupted"),
                                          (ValueError("bad rows"), "failed")])
def test_a_stopped_stage_is_recorded_as_interrupted_a_broken_one_as_failed(tmp_path, stop, status):
    """Ctrl-C raises KeyboardInterrupt; SIGTERM from `ray job stop` raises SystemExit once Ray's
    handler is installed. Either way a rerun knows the stage did not finish, and why."""
    run = Run(tmp_path, "r")
    with pytest.raises(type(stop)):
        with run.stage("teacher", "h"):
            raise stop
    record = run.manifest()["stages"]["teacher"]
    assert record["status"] == status and record["end"] is not None
    assert not run.is_done("teacher", "h")
