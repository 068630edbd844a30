"""k8s/'s manifests, checked offline as far as can be done without a cluster.

- Kubernetes' own objects (the PVC, the Service) and every pod template inside the KubeRay resources are validated
  with kubernetes-validate's strict schemas (Kubernetes' OpenAPI as JSON Schema, shipped in the wheel; strict:
  unknown fields fail, as `kubectl apply --validate=strict` would).
- No package ships KubeRay's CRDs, so the parts of the RayCluster and RayJob specs these manifests use are
  written below as JSON Schema, from KubeRay's v1 API types (ray-operator/apis/ray/v1/raycluster_types.go and
  rayjob_types.go: a field whose json tag lacks `omitempty` is required; int32, bool, map[string]string and the
  enum markers give the types). Unknown fields fail too: the API server would prune them silently.
- The image's Ray equals the one constraints.txt pins (and the one installed here, and cluster.yaml's).
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from conftest import ROOT
from studies.runner.cli import build_parser

K8S = ROOT / "k8s"
KUBERNETES = "1.31.0"  # the oldest Kubernetes still in upstream support when this was written
INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # map[string]string: "0", not 0
OBJECT = {"type": "object"}  # a pod template: checked with Kubernetes' own schema below
QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
WORKER_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {"groupName": {"type": "string", "minLength": 1}, "replicas": INT32, "minReplicas": INT32,
                   "maxReplicas": INT32, "numOfHosts": INT32, "idleTimeoutSeconds": INT32,
                   "suspend": {"type": "boolean"},
                   "rayStartParams": STRING_MAP, "template": OBJECT,
                   "scaleStrategy": {"type": "object", "properties": {"workersToDelete": {"type": "array"}}}}}
RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
        "suspend": {"type": "boolean"}, "headServiceAnnotations": STRING_MAP,
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "idleTimeoutSeconds": INT32,
            "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
            "resources": {"type": "object", "additionalProperties": False,
                          "properties": {"requests": QUANTITIES, "limits": QUANTITIES}},
            "env": {"type": "array"}, "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
            "securityContext": {"type": "object"}}},
        "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["rayStartParams", "template"],
                          "properties": {"rayStartParams": STRING_MAP, "template": OBJECT,
                                         "serviceType": {"type": "string"}, "enableIngress": {"type": "boolean"},
                                         "headService": {"type": "object"}}},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP}}}
RAY_JOB_SPEC = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "clusterSelector": STRING_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC, "metadata": STRING_MAP,
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": INT32,
        "activeDeadlineSeconds": INT32, "backoffLimit": INT32, "suspend": {"type": "boolean"},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"}, "submitterPodTemplate": OBJECT,
        "submitterConfig": {"type": "object", "properties": {"backoffLimit": INT32}}}}


def resource(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["name"]}, "spec": spec}}


KUBERAY = {"RayCluster": resource("RayCluster", RAY_CLUSTER_SPEC), "RayJob": resource("RayJob", RAY_JOB_SPEC)}


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    found = {doc["kind"]: doc for name in ("raycluster.yaml", "rayjob.yaml") for doc in documents(name)}
    assert set(found) == {"PersistentVolumeClaim", "Service", "RayCluster", "RayJob"}, set(found)
    return found


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        spec = spec.get("rayClusterSpec", {})
    groups = [spec["headGroupSpec"]] if "headGroupSpec" in spec else []
    return [group["template"] for group in groups + spec.get("workerGroupSpecs", [])]


def validate(doc: dict) -> None:
    """Raise jsonschema's or kubernetes-validate's ValidationError for anything these schemas refuse."""
    if doc["kind"] in KUBERAY:
        jsonschema.validate(doc, KUBERAY[doc["kind"]])
        for template in pod_templates(doc):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, KUBERNETES, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("kind", ["PersistentVolumeClaim", "Service", "RayCluster", "RayJob"])
def test_manifest_validates(docs, kind):
    validate(docs[kind])


def drop_group_name(docs):
    del docs["RayCluster"]["spec"]["workerGroupSpecs"][0]["groupName"]


def start_param_as_number(docs):
    docs["RayCluster"]["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def misspelled_spec_key(docs):
    spec = docs["RayCluster"]["spec"]
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")


def misspelled_container_key(docs):
    container = docs["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")


def gpu_limit_as_list(docs):
    container = docs["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = [1]


def bad_submission_mode(docs):
    docs["RayJob"]["spec"]["submissionMode"] = "K8sJob"


@pytest.mark.parametrize("break_it", [drop_group_name, start_param_as_number, misspelled_spec_key,
                                      misspelled_container_key, gpu_limit_as_list, bad_submission_mode])
def test_a_broken_copy_fails_validation(docs, break_it):
    broken = copy.deepcopy(docs)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        for doc in broken.values():
            validate(doc)


def containers(template: dict) -> dict[str, dict]:
    return {container["name"]: container for container in template["spec"]["containers"]}


def test_gpu_workers_scale_from_zero_with_gpu_limits(docs):
    spec = docs["RayCluster"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 == group.get("replicas", 0) and group["maxReplicas"] >= 1
    (worker,) = containers(group["template"]).values()
    for kind in ("requests", "limits"):
        assert int(worker["resources"][kind]["nvidia.com/gpu"]) >= 1, kind
    head = containers(spec["headGroupSpec"]["template"])
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head.values())


def test_the_head_pod_serves_mlflow_where_the_job_logs(docs):
    head = containers(docs["RayCluster"]["spec"]["headGroupSpec"]["template"])
    command = " ".join(head["mlflow"]["command"])
    assert command.startswith("mlflow server") and re.search(r"--host 0\.0\.0\.0\b", command)
    assert re.search(r"--port 5000\b", command) and re.search(r"--backend-store-uri sqlite:////", command)
    mount = head["mlflow"]["volumeMounts"][0]["mountPath"]
    assert command.split("--backend-store-uri sqlite:///", 1)[1].startswith(mount), "the database must be on the PVC"
    volumes = {v["name"]: v for v in docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    claim = volumes[head["mlflow"]["volumeMounts"][0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    service = docs["Service"]["spec"]
    assert service["selector"] == {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"], "ray.io/node-type": "head"}
    assert service["ports"][0]["targetPort"] == 5000
    assert "--mlflow-uri http://127.0.0.1:5000" in docs["RayJob"]["spec"]["entrypoint"]  # the driver runs on the head


def test_the_job_runs_a_study_with_flags_the_cli_knows(docs):
    spec = docs["RayJob"]["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}
    python, script, *flags = shlex.split(spec["entrypoint"])
    assert python == "python" and (ROOT / script).is_file(), script
    args = build_parser(Path(script).stem).parse_args(flags)  # an unknown flag would exit here
    assert args.address == "auto" and args.gpus_per_trial >= 1 and args.storage.startswith("s3://")
    working_dir = yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert f"COPY --chown=ray:users . {working_dir}\n" in (K8S / "Dockerfile").read_text()


def pinned_ray() -> str:
    pins = re.findall(r"^ray==([\d.]+)\s*(?:#.*)?$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert len(pins) == 1, "constraints.txt must pin Ray once"
    return pins[0]


def test_the_images_ray_is_the_pinned_ray(docs):
    version = pinned_ray()
    assert ray.__version__ == version, "the Ray installed here is not the pinned one"
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py3\d+-gpu$", (K8S / "Dockerfile").read_text(), flags=re.M)
    assert base and base.group(1) == version, base
    assert docs["RayCluster"]["spec"]["rayVersion"] == version
    images = {c["image"] for template in pod_templates(docs["RayCluster"]) for c in template["spec"]["containers"]}
    assert images and all(image.endswith(f":ray{version}-py311-gpu") for image in images), images
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    assert cluster == f"rayproject/ray:{version}-py311-gpu", cluster
