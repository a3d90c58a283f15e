"""KubeRay manifests (k8s/) against the KubeRay v1 CRD schema, hand-reduced in
k8s/schema/kuberay-v1.yaml (no cluster, nothing downloaded), and the project's own rules: token
auth, no exposed head, the shared storage claim mounted everywhere, the pinned image.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from raydistill.config import DeployConfig

from conftest import REPO

K8S = REPO / "k8s"
STORAGE = "/mnt/cluster_storage"


def _schema() -> dict:
    return yaml.safe_load((K8S / "schema" / "kuberay-v1.yaml").read_text())


def _validator(kind: str) -> jsonschema.Draft7Validator:
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator({**schema, "$ref": f"#/definitions/{kind}"})


def _docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _ray_docs() -> list[dict]:
    return [d for d in _docs() if d["apiVersion"] == "ray.io/v1"]


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [s for s in (spec if doc["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"),
                        spec.get("rayClusterConfig")) if s]


def _pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"], *(g["template"] for g in cluster_spec.get("workerGroupSpecs", []))]


def test_every_kind_is_here():
    assert {d["kind"] for d in _ray_docs()} == {"RayCluster", "RayJob", "RayService"}
    assert (K8S / "Dockerfile").is_file()


@pytest.mark.parametrize("doc", _ray_docs(), ids=lambda d: d["kind"])
def test_manifest_matches_the_kuberay_schema(doc):
    errors = sorted(_validator(doc["kind"]).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_a_rayjob_with_its_own_cluster_validates_too():
    job = _load("rayjob.yaml")
    del job["spec"]["clusterSelector"]
    job["spec"].update(rayClusterSpec=_load("raycluster.yaml")["spec"], shutdownAfterJobFinishes=True)
    _validator("RayJob").validate(job)


def _break(path: list, value, kind="RayCluster", name="raycluster.yaml", delete=False):
    doc = copy.deepcopy(_load(name))
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return kind, doc


@pytest.mark.parametrize("kind, doc", [
    # misspelled fields: KubeRay (kubectl --validate=strict) refuses them
    _break(["spec", "workerGroupSpecs", 0, "minReplica"], 1),
    _break(["spec", "headGroupSpec", "rayStartParam"], {}),
    _break(["spec", "headGroupSpec", "template", "spec", "containers", 0, "resource"], {}),
    # wrong types
    _break(["spec", "workerGroupSpecs", 1, "maxReplicas"], "2"),
    _break(["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),  # must be the string "0"
    _break(["spec", "authOptions", "mode"], "on"),
    _break(["spec", "submissionMode"], "K8sJob", kind="RayJob", name="rayjob.yaml"),
    _break(["spec", "entrypointNumCpus"], "0", kind="RayJob", name="rayjob.yaml"),
    _break(["spec", "clusterSelector"], None, kind="RayJob", name="rayjob.yaml", delete=True),  # no cluster at all
    _break(["spec", "upgradeStrategy", "type"], "Rolling", kind="RayService", name="rayservice.yaml"),
    _break(["apiVersion"], "ray.io/v1alpha1"),
], ids=["minReplica", "rayStartParam", "resource", "maxReplicas-str", "num-cpus-int", "auth-mode",
        "submissionMode", "entrypointNumCpus-str", "no-cluster", "upgradeStrategy", "old-apiVersion"])
def test_schema_rejects_broken_manifests(kind, doc):
    with pytest.raises(jsonschema.ValidationError):
        _validator(kind).validate(doc)


@pytest.mark.parametrize("doc", _ray_docs(), ids=lambda d: d["kind"])
def test_secure_by_default(doc):
    for spec in _cluster_specs(doc):
        assert spec["authOptions"] == {"mode": "token"}  # the operator makes and injects the token
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a LoadBalancer/NodePort
        assert not head.get("enableIngress", False)
        assert head["rayStartParams"]["num-cpus"] == "0"  # no work on the head
        assert spec["rayVersion"] == "2.60.0"
    text = yaml.safe_dump(doc)
    assert "RAY_AUTH_TOKEN" not in text and "auth_token" not in text  # no token in the repo


def test_network_policy_guards_the_ray_pods():
    policy = next(d for d in _docs() if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for doc in _ray_docs():
        for spec in _cluster_specs(doc):
            for template in _pod_templates(spec):
                assert selected.items() <= template["metadata"]["labels"].items()
    # Outside the cluster's own pods and the operator, only the Serve port is reachable.
    for rule in policy["spec"]["ingress"]:
        if any("raydistill-client" in str(f) for f in rule["from"]):
            assert [p["port"] for p in rule["ports"]] == [8000]


def test_shared_storage_claim_is_mounted_everywhere():
    pvc = _load("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    for doc in _ray_docs():
        for spec in _cluster_specs(doc):
            for template in _pod_templates(spec):
                pod = template["spec"]
                volume = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
                mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == volume]
                assert mounts == [STORAGE], doc["kind"]
    job = _load("rayjob.yaml")["spec"]
    assert f"--storage {STORAGE}/runs" in job["entrypoint"] and job["entrypointNumCpus"] == 0


def test_serve_config_builds_our_app():
    service = _load("rayservice.yaml")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serve.app:build" and (REPO / "serve" / "app.py").is_file()
    DeployConfig.model_validate(app["args"]["deploy"])  # the args our builder takes
    assert app["args"]["weights"].startswith(f"{STORAGE}/runs/")


def test_image_installs_the_pinned_project_as_non_root():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
    assert "\nUSER 1000" in dockerfile
    images = {c["image"] for d in _ray_docs() for s in _cluster_specs(d) for t in _pod_templates(s)
              for c in t["spec"]["containers"]}
    assert len(images) == 1  # one image, built from k8s/Dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
