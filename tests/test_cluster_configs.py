"""cluster.yaml, the KubeRay manifests and the container recipe agree with Ray and this repo.

cluster.yaml is checked the way `ray up` checks it before touching the cloud: against the
autoscaler's JSON schema shipped inside the ray package, then filled with the AWS defaults and
validated again. The KubeRay CRDs are not available offline, so the manifests get a structural
check: kinds, the autoscaling GPU group, one image (the Dockerfile's tag), one Ray version, the
same auth settings in every container, and entrypoints that name code in this repository.
"""

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = {
    "RayCluster": "kuberay-raycluster.yaml",
    "RayJob": "kuberay-rayjob.yaml",
    "RayService": "kuberay-rayservice.yaml",
}
TOKEN_SECRET = {"name": "maskdistill-ray-token", "key": "auth_token"}
DATA_CLAIM = "maskdistill-data"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def _image_tag() -> str:
    """The tag the Dockerfile's build command gives the image (`docker build ... -t TAG .`)."""
    (tag,) = re.findall(r"docker build .*-t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    return tag


def _base_ray_version() -> str:
    (base,) = [i.split()[1] for i in _dockerfile() if i.startswith("FROM ")]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", base)
    assert match, f"cluster/Dockerfile: FROM {base}: expected rayproject/ray:X.Y.Z-pyNNN-gpu"
    return match.group(1)


def _extras(command: str) -> set[str]:
    """The extras of every `pip install -e ...[a,b]` in a shell command."""
    return {
        extra
        for group in re.findall(r"pip install [^&;]*?-e \S*?\[([\w,-]+)\]", command)
        for extra in group.split(",")
    }


# --- cluster.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_yaml() -> dict[str, Any]:
    return _yaml(REPO / "cluster.yaml")


def test_cluster_yaml_matches_the_autoscaler_schema(cluster_yaml: dict[str, Any]) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster_yaml, json.loads(schema_path.read_text()))
    validate_config(prepare_config(cluster_yaml))  # what `ray up` does before the cloud


def test_the_schema_check_catches_a_misspelt_key(cluster_yaml: dict[str, Any]) -> None:
    broken = {**cluster_yaml, "head_start_ray_command": cluster_yaml["head_start_ray_commands"]}
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        validate_config(prepare_config(broken))


def test_cpu_head_and_gpu_workers_that_scale_from_zero(cluster_yaml: dict[str, Any]) -> None:
    types = cluster_yaml["available_node_types"]
    head = types[cluster_yaml["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = [t for name, t in types.items() if name != cluster_yaml["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    assert gpu, "a worker type with GPUs"
    assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)


def test_token_auth_on_every_ray_start_and_the_token_on_every_node(
    cluster_yaml: dict[str, Any],
) -> None:
    starts = cluster_yaml["head_start_ray_commands"] + cluster_yaml["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    assert "--env RAY_AUTH_MODE=token" in cluster_yaml["docker"]["run_options"]
    assert cluster_yaml["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_setup_installs_this_checkout_with_real_extras(cluster_yaml: dict[str, Any]) -> None:
    extras = set(_pyproject()["project"]["optional-dependencies"])
    common = " ".join(cluster_yaml["setup_commands"])
    workers = " ".join(cluster_yaml["worker_setup_commands"])
    assert "cluster" in _extras(common) <= extras
    assert {"cluster", "gpu"} <= _extras(workers) <= extras
    assert cluster_yaml["file_mounts"]["~/maskdistill"] == "."
    assert {".venv", "runs"} <= set(cluster_yaml["rsync_exclude"])


def test_cluster_yaml_runs_the_dockerfiles_ray(cluster_yaml: dict[str, Any]) -> None:
    assert cluster_yaml["docker"]["image"] == f"rayproject/ray:{_base_ray_version()}-py311-gpu"


# --- cluster/Dockerfile ---------------------------------------------------------------------


def test_dockerfile_copies_only_paths_that_exist() -> None:
    copies = [shlex.split(i)[1:] for i in _dockerfile() if i.startswith("COPY ")]
    sources = [s for args in copies for s in [a for a in args if not a.startswith("--")][:-1]]
    assert {"pyproject.toml", "maskdistill", "jobs", "serve", "configs"} <= set(sources)
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"cluster/Dockerfile copies paths missing from the repo: {missing}"


def test_dockerfile_installs_real_extras_and_turns_token_auth_on() -> None:
    runs = " ".join(i for i in _dockerfile() if i.startswith("RUN "))
    assert (
        {"cluster", "gpu"} <= _extras(runs) <= set(_pyproject()["project"]["optional-dependencies"])
    )
    assert "ENV RAY_AUTH_MODE=token" in _dockerfile()


def test_image_tag_carries_the_package_version() -> None:
    assert _image_tag().endswith(f"/maskdistill:{_pyproject()['project']['version']}")


# --- KubeRay manifests ----------------------------------------------------------------------


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[manifest["kind"]]


def _pod_specs(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = _cluster_spec(manifest)
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]
    if manifest["kind"] == "RayJob":
        yield manifest["spec"]["submitterPodTemplate"]["spec"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _yaml(CLUSTER / MANIFESTS[request.param]) | {"_expected_kind": request.param}


def test_manifest_has_its_kind_and_an_autoscaling_gpu_group(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == manifest["_expected_kind"]
    assert manifest["metadata"]["name"]
    spec = _cluster_spec(manifest)
    assert spec["rayVersion"] == _base_ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups and all(g["minReplicas"] == 0 < g["maxReplicas"] for g in gpu_groups)
    assert all(g["groupName"] for g in spec["workerGroupSpecs"])


def test_every_container_runs_the_image_with_token_auth(manifest: dict[str, Any]) -> None:
    token = {"secretKeyRef": TOKEN_SECRET}
    containers = [c for pod in _pod_specs(manifest) for c in pod["containers"]]
    assert len(containers) >= 2
    for container in containers:
        assert container["image"] == _image_tag(), container["name"]
        env = _env(container)
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", token), container["name"]
    autoscaler = _cluster_spec(manifest)["autoscalerOptions"]
    assert _env(autoscaler) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def test_every_ray_pod_mounts_the_shared_volume(manifest: dict[str, Any]) -> None:
    spec = _cluster_spec(manifest)
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert claims.get(mounts.get("/data", "")) == DATA_CLAIM


def _job() -> dict[str, Any]:
    return _yaml(CLUSTER / MANIFESTS["RayJob"])


def _serve_app() -> dict[str, Any]:
    serve_config = yaml.safe_load(_yaml(CLUSTER / MANIFESTS["RayService"])["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    return app


def _entrypoint_flags(entrypoint: list[str]) -> dict[str, str]:
    """--config and every --set KEY=VALUE of a pipeline command line."""
    flags = {"config": entrypoint[entrypoint.index("--config") + 1]}
    for i, word in enumerate(entrypoint):
        if word == "--set":
            key, _, value = entrypoint[i + 1].partition("=")
            flags[key] = value
    return flags


def test_rayjob_runs_the_pipeline_module_on_a_shipped_config() -> None:
    entrypoint = shlex.split(_job()["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "jobs.pipeline"]
    assert (REPO / "jobs" / "pipeline.py").exists()
    flags = _entrypoint_flags(entrypoint)
    assert (REPO / flags["config"]).exists()
    assert flags["run_dir"].startswith("/data/")
    runtime_env = yaml.safe_load(_job()["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/maskdistill"
    assert "WORKDIR /home/ray/maskdistill" in _dockerfile()


def test_rayservice_serves_the_run_the_rayjob_trains() -> None:
    app = _serve_app()
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    flags = _entrypoint_flags(shlex.split(_job()["spec"]["entrypoint"]))
    assert app["args"]["run_dir"] == flags["run_dir"]


# --- cluster/local_cluster.py ---------------------------------------------------------------


def test_local_cluster_down_without_up_names_the_missing_state(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(CLUSTER / "local_cluster.py"), "down", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"{tmp_path / 'state.json'}: no cluster was started there" in done.stderr


def _local_cluster(monkeypatch: pytest.MonkeyPatch) -> Any:
    """cluster/local_cluster.py as a module (a script outside the package)."""
    spec = importlib.util.spec_from_file_location("local_cluster", CLUSTER / "local_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "local_cluster", module)  # its dataclass looks itself up
    spec.loader.exec_module(module)
    return module


def _fake_node(script: str) -> Any:
    """A `_start_node` that runs `script` (its argument list's first item picks the behaviour)."""

    def start(args: list[str], *, env: dict[str, str], log: Path) -> int:
        with open(log, "wb") as out:
            shell = ["sh", "-c", script, "node", *args]
            return subprocess.Popen(shell, stdout=out, stderr=subprocess.STDOUT).pid

    return start


def test_a_node_that_exits_at_start_is_started_again_on_fresh_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _local_cluster(monkeypatch)
    tries = iter(["taken", "free"])  # the first draw's port is taken, the second's is not
    # A taken port makes the node print Ray's bind error and exit; a free one keeps it running.
    script = 'if [ "$1" = taken ]; then echo "bind: address already in use"; exit 1; fi; sleep 30'
    monkeypatch.setattr(local, "_start_node", _fake_node(script))
    started: list[list[str]] = []
    logs: dict[int, Path] = {}
    args = local._launch(
        "worker_1",
        lambda: [next(tries)],
        lambda args: args == ["free"] and len(logs) == 1,
        env={},
        root=tmp_path,
        logs=logs,
        on_start=started.append,
        timeout=20,
    )
    assert args == ["free"]
    assert len(logs) == 1  # the exited try is no longer one of the cluster's nodes
    assert [path.name for path in logs.values()] == ["worker_1.try2.log"]
    assert "address already in use" in (tmp_path / "worker_1.log").read_text()
    for pid in logs:
        local._signal_group(pid, local.signal.SIGKILL)


def test_a_node_that_keeps_exiting_fails_with_its_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _local_cluster(monkeypatch)
    monkeypatch.setattr(local, "_start_node", _fake_node('echo "raylet: bad flag $1"; exit 1'))
    with pytest.raises(local.NodeExited) as exited:
        local._launch(
            "head",
            lambda: ["--x"],
            lambda args: False,
            env={},
            root=tmp_path,
            logs={},
            on_start=lambda args: None,
            timeout=20,
        )
    assert exited.value.log == tmp_path / f"head.try{local.NODE_TRIES}.log"
    assert "a node exited while waiting for head" in str(exited.value)
    assert "raylet: bad flag --x" in str(exited.value)  # the cause, though the files go
