"""The Ray internals the tests read, in one place. Each has no public equivalent in Ray 2.60.0,
the version these were checked against (constraints.txt); a Ray upgrade that moves one breaks
here, by name, not across the suite. The product's code uses none of them."""

from __future__ import annotations

import copy
import json
from pathlib import Path


def zip_upload(root: Path, excludes: list[str], out: Path, include_gitignore: bool) -> None:
    """The zip `ray job submit --working-dir` would upload (runtime_env packaging)."""
    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(root), excludes, str(out), include_gitignore=include_gitignore)


def validated_cluster_config(config: dict) -> dict:
    """What `ray up` makes of a cluster-launcher config: defaults filled in, then validated
    (raises jsonschema.ValidationError)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# For a subprocess: the dashboard URL and node IP of the Ray this process started.
LOCAL_NODE_INFO = ("node = ray._private.worker.global_worker.node\n"
                   "info = {'dashboard': node.address_info['webui_url'], 'node_ip': node.node_ip_address}\n")


def registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has registered a teacher checkpoint under run_dir. A checkpoint folder
    in storage is not enough: the controller registers it only when it next polls the workers,
    and persists what it registered in checkpoint_manager_snapshot.json."""
    for snapshot in run_dir.glob("teacher/ray/teacher-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:  # caught mid-write
            pass
    return False


def terminated_tune_trials(experiment: Path) -> list[str]:
    """Ids of the trials Tune's saved experiment state (experiment_state-*.json) records as
    TERMINATED: what a Tuner.restore keeps."""
    found = []
    for state in experiment.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            continue  # caught mid-write
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                found.append(trial["trial_id"])
    return found
