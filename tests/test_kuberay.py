"""deploy/kuberay/rayjob.yaml is a valid KubeRay RayJob that runs this repository's train stage
the way README "Running on a cluster" says.

No PyPI package ships KubeRay's CRD schemas (kubernetes-validate has the core API only), so
RAYJOB is a subset of the CRD's openAPIV3Schema, written from KubeRay's published CRD
(ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayjobs.yaml, apiVersion ray.io/v1)
and its API reference (RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
AuthOptions): the fields the manifest uses, with their types, enums and required keys, and
``additionalProperties: false`` where the CRD lists every field, so a misspelt key fails here.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "deploy" / "kuberay" / "rayjob.yaml"

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {  # core/v1 PodTemplateSpec: checked only as far as the manifest relies on it
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        }
    },
}
RAYJOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "clusterSelector": STRING_MAP,
                "entrypoint": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "jobId": {"type": "string"},
                "metadata": STRING_MAP,
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "submissionMode": {
                    "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                },
                "submitterPodTemplate": POD_TEMPLATE,
                "suspend": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "authOptions": {
                            "type": "object",
                            "properties": {"mode": {"enum": ["disabled", "token"]}},
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "properties": {
                                "rayStartParams": STRING_MAP,
                                "template": POD_TEMPLATE,
                                "serviceType": {"type": "string"},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": STRING_MAP,
                                    "template": POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_rayjob_manifest_matches_the_crd_schema():
    jsonschema.validate(_manifest(), RAYJOB)


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),
        (("spec", "submissionMode"), "K8sMode"),
        (("spec", "entrypoints"), "retina-vae train"),
        (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens"),
    ],
    ids=["int-start-param", "unknown-mode", "misspelt-key", "unknown-auth-mode"],
)
def test_the_schema_refuses_what_kuberay_refuses(path, value):
    """The schema is not vacuous: each of these mistakes KubeRay's CRD rejects fails here."""
    bad = copy.deepcopy(_manifest())
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB)


def test_rayjob_runs_the_train_stage_on_a_zero_cpu_head_with_gloo_on_eth0():
    spec = _manifest()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["retina-vae", "train"] and "train" in COMMANDS
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["GLOO_SOCKET_IFNAME"] == "eth0"
    images = {c["image"] for c in spec["submitterPodTemplate"]["spec"]["containers"]}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        assert {e["name"] for e in container["env"]} >= {"AWS_ACCESS_KEY_ID", "GLOO_SOCKET_IFNAME"}
    assert len(images) == 1  # one image everywhere: the same code and Ray on every pod
