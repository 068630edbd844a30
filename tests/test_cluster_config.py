"""cluster.yaml passes Ray's own autoscaler schema and sets up what a multi-node study needs.

Offline: Ray fills in its AWS defaults and checks the schema without credentials or network.
"""
import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from analysis.ray_internals import validate_cluster_yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def config(raw: dict) -> dict:
    """The config as `ray up` sees it: defaults merged, setup commands merged per node kind."""
    return validate_cluster_yaml(copy.deepcopy(raw))


def worker_types(config: dict) -> dict:
    return {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}


def test_validates_against_ray_schema(config):
    assert config["provider"]["type"] == "aws"
    assert config["cluster_name"] == "vision-tune"


def test_gpu_workers_declare_gpus(config):
    workers = worker_types(config)
    assert workers, "no worker node types"
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, f"{name} declares no GPU"
        assert node["resources"].get("CPU", 0) >= 1, f"{name} declares no CPU"
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    instance_types = {node["node_config"]["InstanceType"] for node in workers.values()}
    assert {"g5.xlarge", "g5.12xlarge"} <= instance_types


def test_head_is_cpu_only(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1


def test_every_node_sets_an_explicit_ami(config):
    # Ray's built-in default AMI is too old for current CUDA drivers.
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("ImageId", "").startswith("ami-"), name


def test_head_starts_mlflow_server_on_port_5000(config):
    commands = config["head_start_ray_commands"]
    assert any("ray start --head" in cmd for cmd in commands)
    mlflow = [cmd for cmd in commands if "mlflow server" in cmd]
    assert len(mlflow) == 1, "the head's start commands must start `mlflow server` once"
    cmd = mlflow[0]
    assert re.search(r"--host[ =]0\.0\.0\.0\b", cmd), "MLflow must listen beyond localhost for the workers"
    assert re.search(r"--port[ =]5000\b", cmd)
    assert re.search(r"--backend-store-uri[ =]sqlite:////", cmd), "SQLite path must be absolute"
    assert re.search(r"--(artifacts-destination|default-artifact-root)[ =]s3://", cmd)
    assert re.search(r"&\s*(fi\s*)?$", cmd), "the server must run in the background, or `ray up` blocks"


@pytest.mark.parametrize("kind", ["head_setup_commands", "worker_setup_commands", "head_start_ray_commands"])
def test_commands_are_valid_shell(config, kind):
    for cmd in config[kind]:
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{kind}: {cmd!r}: {result.stderr}"


def test_image_is_a_pinned_ray_gpu_image(config):
    docker = config["docker"]
    assert docker["container_name"]
    images = {docker.get(key) for key in ("image", "head_image", "worker_image")} - {None}
    assert images
    for image in images:
        assert not image.startswith("rayproject/ray-ml"), "ray-ml images stopped at Ray 2.30"
        assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-gpu", image), image
    assert "--gpus all" in docker.get("worker_run_options", []) + docker.get("run_options", [])
    assert "--gpus all" not in docker.get("head_run_options", []) + docker.get("run_options", [])


def test_code_is_mounted_and_installed_on_every_node(config):
    mounts = {remote: local for remote, local in config["file_mounts"].items() if local in (".", "./")}
    assert len(mounts) == 1, "the repository root must be mounted"
    remote = next(iter(mounts)).rstrip("/")
    for kind in ("head_setup_commands", "worker_setup_commands"):  # the locked set first, then the project
        assert any(re.search(rf"pip install --require-hashes -r {re.escape(remote)}/requirements.lock && "
                             rf"pip install --no-deps -e {re.escape(remote)}\b", cmd) for cmd in config[kind]), kind
    assert ".venv" in config["rsync_exclude"], "the local virtualenv must not be copied to the nodes"


def test_results_storage_is_s3(raw):
    text = CLUSTER_YAML.read_text()
    assert "s3://YOUR-BUCKET/vision-tune" in text
    for name, node in worker_types(raw).items():
        assert "IamInstanceProfile" in node["node_config"], f"{name}: trials could not write to S3"


def drop_head_node_config(cfg):
    del cfg["available_node_types"][cfg["head_node_type"]]["node_config"]


def gpu_as_string(cfg):
    next(iter(worker_types(cfg).values()))["resources"]["GPU"] = "1"


def misspelled_key(cfg):
    cfg["setup_command"] = cfg.pop("setup_commands")


@pytest.mark.parametrize("break_it", [drop_head_node_config, gpu_as_string, misspelled_key])
def test_broken_copy_fails_validation(raw, break_it):
    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_yaml(broken)
