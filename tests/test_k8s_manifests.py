"""Every manifest in k8s/ against the official schemas: KubeRay v1.7.0's CRDs (k8s/crds/) for
the Ray kinds and kubernetes-validate's Kubernetes schemas for the built-in kinds, with unknown
fields refused as `kubectl apply --validate=strict` refuses them (no cluster, nothing
downloaded); then the project's own rules: token auth, no exposed head, non-root pods, the
shared storage claim mounted everywhere, the pinned image, the NetworkPolicy's allow-lists.
"""

from __future__ import annotations

import copy
import functools

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raydistill.config import DeployConfig

from conftest import REPO

K8S = REPO / "k8s"
STORAGE = "/mnt/cluster_storage"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for (KubeRay 1.7 supports it)


def _strict(schema):
    """A CRD's structural schema as plain JSON Schema: the `x-kubernetes-*` extensions dropped
    (int-or-string keeps its anyOf), and every object with declared properties closed to
    others, as the API server's strict field validation treats them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((K8S / "crds" / CRDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


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
def test_manifest_matches_the_official_kuberay_crd(doc):
    errors = sorted(_validator(doc["kind"]).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The CRD's embedded pod templates, checked again against Kubernetes' own PodTemplateSpec
    # (with its field descriptions and formats the CRD copies leave out).
    for spec in _cluster_specs(doc):
        for template in _pod_templates(spec):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", [d for d in _docs() if d["apiVersion"] != "ray.io/v1"], ids=lambda d: d["kind"])
def test_builtin_kinds_match_the_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", [
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
     "spec": {"podSelectr": {}}},  # misspelled
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
     "spec": {"podSelector": {}, "policyTypes": "Egress"}},  # a string for a list
    {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
     "spec": {"accessModes": "ReadWriteMany"}},
], ids=["misspelled", "policyTypes-str", "accessModes-str"])
def test_kubernetes_schemas_reject_broken_builtin_kinds(doc):
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


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
    # misspelled fields: kubectl apply --validate=strict refuses them
    _break(["spec", "workerGroupSpecs", 0, "minReplica"], 1),
    _break(["spec", "headGroupSpec", "rayStartParam"], {}),
    _break(["spec", "headGroupSpec", "template", "spec", "containers", 0, "resource"], {}),
    _break(["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "securityContex"], {},
           kind="RayService", name="rayservice.yaml"),
    # wrong types
    _break(["spec", "workerGroupSpecs", 1, "maxReplicas"], "2"),
    _break(["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),  # must be the string "0"
    _break(["spec", "authOptions", "mode"], "on"),
    _break(["spec", "entrypointNumCpus"], "0", kind="RayJob", name="rayjob.yaml"),
    _break(["spec", "serveConfigV2"], {"applications": []}, kind="RayService", name="rayservice.yaml"),
    # missing what the schema requires
    _break(["spec", "headGroupSpec"], None, delete=True),
    _break(["apiVersion"], "ray.io/v1alpha1"),
], ids=["minReplica", "rayStartParam", "resource", "securityContex", "maxReplicas-str", "num-cpus-int",
        "auth-mode", "entrypointNumCpus-str", "serveConfigV2-object", "no-headGroupSpec", "old-apiVersion"])
def test_schema_rejects_broken_manifests(kind, doc):
    with pytest.raises(jsonschema.ValidationError):
        _validator(kind).validate(doc)


def _operator_refuses(doc: dict) -> list[str]:
    """What KubeRay's operator itself refuses beyond its CRD schemas (its validation rules for
    the fields these manifests set; the CRDs leave them open strings)."""
    spec, problems = doc["spec"], []
    if doc["kind"] == "RayJob":
        if not (spec.get("clusterSelector") or spec.get("rayClusterSpec")):
            problems.append("a RayJob needs clusterSelector or rayClusterSpec")
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
            problems.append(f"unknown submissionMode {spec['submissionMode']}")
        if not spec.get("entrypoint"):
            problems.append("a RayJob needs an entrypoint")
    if doc["kind"] == "RayService":
        kind = spec.get("upgradeStrategy", {}).get("type", "NewCluster")
        if kind not in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            problems.append(f"unknown upgradeStrategy.type {kind}")
    return problems


@pytest.mark.parametrize("doc", _ray_docs(), ids=lambda d: d["kind"])
def test_manifests_meet_the_operators_own_rules(doc):
    assert _operator_refuses(doc) == []


@pytest.mark.parametrize("kind, doc", [
    _break(["spec", "submissionMode"], "K8sJob", kind="RayJob", name="rayjob.yaml"),
    _break(["spec", "clusterSelector"], None, kind="RayJob", name="rayjob.yaml", delete=True),  # no cluster at all
    _break(["spec", "upgradeStrategy", "type"], "Rolling", kind="RayService", name="rayservice.yaml"),
], ids=["submissionMode", "no-cluster", "upgradeStrategy"])
def test_operator_rules_catch_what_the_schema_lets_through(kind, doc):
    _validator(kind).validate(doc)  # the CRD takes it...
    assert _operator_refuses(doc)  # ...the operator would not


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


def test_network_policy_guards_the_ray_pods_both_ways():
    policy = next(d for d in _docs() if d["kind"] == "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    selected = policy["podSelector"]["matchLabels"]
    for doc in _ray_docs():
        for spec in _cluster_specs(doc):
            for template in _pod_templates(spec):
                assert selected.items() <= template["metadata"]["labels"].items()
    job = _load("rayjob.yaml")["spec"]["submitterPodTemplate"]  # the submitter reaches the Jobs API
    assert selected.items() <= job["metadata"]["labels"].items()
    peers = {yaml.safe_dump(peer, sort_keys=True): rule for rule in policy["ingress"] for peer in rule["from"]}
    # The operator by the label its Helm chart sets, in any namespace (not by a namespace's name).
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    assert yaml.safe_dump(operator, sort_keys=True) in peers
    # Clients (an ingress controller in its own namespace) reach the Serve port only.
    client = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"raydistill-client": "true"}}}
    assert [p["port"] for p in peers[yaml.safe_dump(client, sort_keys=True)]["ports"]] == [8000]
    assert not any("namespaceSelector" in peer and "podSelector" not in peer for peer in
                   (p for rule in policy["ingress"] for p in rule["from"]))  # no namespace let in whole
    # Egress: DNS, the cluster's pods, and HTTPS/NFS/API out of the cluster - not the metadata endpoint.
    blocks = [peer["ipBlock"] for rule in policy["egress"] for peer in rule["to"] if "ipBlock" in peer]
    assert blocks and all("169.254.169.254/32" in b.get("except", []) for b in blocks)
    open_ports = {p["port"] for rule in policy["egress"] if any("ipBlock" in peer for peer in rule["to"])
                  for p in rule["ports"]}
    assert open_ports == {443, 6443, 2049}
    dns = next(rule for rule in policy["egress"] if any("k8s-app" in str(peer) for peer in rule["to"]))
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}


def _all_pod_specs() -> list[tuple[str, dict]]:
    pods = [(f"{d['kind']}/{t['spec']['containers'][0]['name']}", t["spec"])
            for d in _ray_docs() for s in _cluster_specs(d) for t in _pod_templates(s)]
    return pods + [("RayJob/submitter", _load("rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"])]


@pytest.mark.parametrize("name, pod", _all_pod_specs(), ids=[n for n, _ in _all_pod_specs()])
def test_pods_run_unprivileged_and_hold_no_api_token_they_do_not_need(name, pod):
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # Only a head whose in-tree autoscaler calls the Kubernetes API mounts its token.
    needs_token = name.endswith("ray-head")
    assert pod["automountServiceAccountToken"] is needs_token
    if needs_token:
        assert all(_load(f)["spec"].get("enableInTreeAutoscaling") or _load(f)["spec"].get(
            "rayClusterConfig", {}).get("enableInTreeAutoscaling") for f in ("raycluster.yaml", "rayservice.yaml"))


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
    assert app["import_path"] == "raydistill.serving:app"  # in the image's installed package
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


def test_gcs_fault_tolerance_points_at_the_redis_the_folder_deploys():
    redis = {d["kind"]: d for d in yaml.safe_load_all((K8S / "redis.yaml").read_text()) if d}
    service, port = redis["Service"]["metadata"]["name"], redis["Service"]["spec"]["ports"][0]["port"]
    secret = redis["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    for name in ("raycluster.yaml", "rayservice.yaml"):
        (spec,) = _cluster_specs(_load(name))
        ft = spec["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] == f"{service}:{port}", name
        assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == secret, name
    # The Ray pods may reach Redis, and only they may.
    policy = next(d for d in _docs() if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "raydistill-ray")
    assert any(peer.get("podSelector", {}).get("matchLabels") == redis["Service"]["spec"]["selector"]
               for rule in policy["spec"]["egress"] for peer in rule["to"])
    guard = redis["NetworkPolicy"]["spec"]
    assert guard["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "raydistill"}}}],
                                 "ports": [{"protocol": "TCP", "port": 6379}]}]
