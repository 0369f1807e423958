"""cluster.yaml: valid for Ray's own cluster-launcher schema, and set up the way snp_ray needs.

Offline: only Ray's config preparation (merging the AWS defaults.yaml) and its JSON-schema
validation run; no provider bootstrap, no boto3, no network (sockets are blocked to prove it).
"""
from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
REMOTE_REPO = "/home/ubuntu/snp_ray"
REMOTE_DATA = "/home/ubuntu/shared/data"


@pytest.fixture(scope="module", autouse=True)
def _no_network():
    """Module-wide (autouse runs first), so the module-scoped `cfg` is built with sockets blocked."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster.yaml validation tried to open a connection: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


def _raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _check(config: dict) -> dict:
    """What `ray up` does to a config before touching the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return _raw()


@pytest.fixture(scope="module")
def cfg(raw) -> dict:
    return _check(raw)


def _split_types(cfg):
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    return types[head], workers


def test_valid_for_ray_schema(cfg):
    assert cfg["cluster_name"] == "snp-ray"
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 1
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0


def test_aws_provider(raw):
    p = raw["provider"]
    assert p["type"] == "aws"
    assert p["region"] == "us-west-2"
    assert all(z.startswith("us-west-2") for z in p["availability_zone"].split(","))
    assert p["cache_stopped_nodes"] is False
    assert raw["auth"]["ssh_user"] == "ubuntu"


def test_head_has_no_gpu(cfg):
    head, _ = _split_types(cfg)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1
    assert head["max_workers"] == 0
    assert head["node_config"]["InstanceType"]
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", head["node_config"]["ImageId"])


def test_autoscaling_gpu_worker(cfg):
    _, workers = _split_types(cfg)
    gpu = {n: t for n, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, "no worker node type advertises a GPU"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: GPU nodes should scale down to zero"
        assert 1 <= t["max_workers"] <= cfg["max_workers"], name
        assert t["resources"].get("CPU", 0) >= 1, name
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", t["node_config"]["ImageId"]), name
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_file_mounts_ship_project_and_data(raw):
    mounts = raw["file_mounts"]
    assert (REPO / mounts[REMOTE_REPO]).resolve() == REPO  # `ray up` runs from the repo root
    assert mounts[REMOTE_DATA] == "../shared/data"
    assert ".venv" in raw["rsync_exclude"]  # never ship the local venv


def test_token_auth_on_every_node(cfg):
    """The launcher's ~/.ray/auth_token goes to every node and Ray starts there in token mode."""
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_setup_commands", "worker_setup_commands"):
        joined = "\n".join(cfg[key])
        assert "export RAY_AUTH_MODE=token" in joined and "~/.bashrc" in joined, key
        assert "RAY_AUTH_MODE=disabled" not in joined, key
    starts = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in starts


def test_setup_installs_with_constraints_and_sets_env(cfg):
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        cmds = cfg[key]
        joined = "\n".join(cmds)
        assert any("python3 -m venv .venv" in c and "pip install -c constraints.txt -e ." in c
                   for c in cmds), key
        assert f"export SNP_DATA_ROOT={REMOTE_DATA}" in joined, key
        assert "export RAY_USAGE_STATS_ENABLED=0" in joined, key
        assert "~/.bashrc" in joined, key
        # every pip runs inside the venv (AWS defaults would otherwise add a system `pip install`)
        for c in cmds:
            for m in re.finditer(r"(\S*)pip install", c):
                assert m.group(1).endswith(".venv/bin/"), f"{key}: pip outside the venv: {c}"


def test_start_commands_use_venv_ray(cfg):
    head = cfg["head_start_ray_commands"]
    worker = cfg["worker_start_ray_commands"]
    venv_ray = "~/snp_ray/.venv/bin/ray"
    assert head[0] == f"{venv_ray} stop" and worker[0] == f"{venv_ray} stop"
    start = head[-1]
    assert start.startswith("ulimit -n 65536;") and f"{venv_ray} start --head" in start
    for flag in ("--port=6379", "--dashboard-host=0.0.0.0", "--object-manager-port=8076",
                 "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in start
    assert f"{venv_ray} start --address=$RAY_HEAD_IP:6379" in worker[-1]
    assert "--object-manager-port=8076" in worker[-1]


def test_ray_version_matches_constraints():
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    assert pins["ray"] == ray.__version__
    assert f"ray=={pins['ray']}" in CLUSTER_YAML.read_text(), "cluster.yaml names another Ray"


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "max_workers_not_int",
                                      "node_type_without_node_config", "head_type_missing"])
def test_broken_copies_fail_validation(breakage):
    bad = _raw()
    if breakage == "unknown_top_level_key":
        bad["max_wrokers"] = 8
    elif breakage == "max_workers_not_int":
        bad["max_workers"] = "eight"
    elif breakage == "node_type_without_node_config":
        del bad["available_node_types"]["worker.gpu.a10g"]["node_config"]
    elif breakage == "head_type_missing":
        bad["head_node_type"] = "no.such.type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _check(bad)
