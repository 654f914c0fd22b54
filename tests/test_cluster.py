"""Offline checks of the deployment files in cluster/.

- cluster/aws-gpu.yaml: Ray's own cluster-launcher validation (prepare_config + validate_config,
  the schema `ray up` applies), with the network blocked so nothing can reach AWS.
- cluster/raycluster.yaml, cluster/rayjob.yaml: the KubeRay CRD OpenAPI schemas in
  ../shared/schemas/kuberay/, made strict (unknown fields rejected, like `kubeconform -strict`).
- cluster/runtime_env.yaml: Ray's RuntimeEnv, the excludes applied by Ray's own matcher.
- Every pipelines/*.py, tune_spaces/*.yaml and cluster/* path the files name exists, and the
  pipeline flags they use belong to the pipelines' CLI.

No Ray cluster is started; the module runs in a few seconds.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SHARED = REPO.parent / "shared"
KUBERAY_SCHEMAS = SHARED / "schemas" / "kuberay"

PYTHON_TAG = "py311"  # the images' Python; the project targets 3.11

# The pipelines' command lines (stable contract; see the project issues).
PIPELINE_FLAGS: dict[str, set[str]] = {
    "prepare": {"--input", "--output", "--min-user", "--min-item"},
    "train": {
        "--data",
        "--num-workers",
        "--use-gpu",
        "--config",
        "--set",
        "--name",
        "--resume",
        "--mlflow-uri",
    },
    "tune": {
        "--data",
        "--space",
        "--num-samples",
        "--max-concurrent",
        "--workers-per-trial",
        "--use-gpu",
        "--set",
        "--name",
        "--resume",
        "--mlflow-uri",
    },
}

RUNTIME_ENV_REQUIRED_EXCLUDES = {"outputs/", ".venv/", "data/", "*.parquet", ".git/"}


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_version() -> str:
    import ray

    return ray.__version__


# --------------------------------------------------------------------------------------------
# ../shared: skip when absent, except on CI where its absence is a failure.
# --------------------------------------------------------------------------------------------


def _require_shared() -> None:
    if (
        KUBERAY_SCHEMAS.joinpath("ray.io_rayclusters.yaml").is_file()
        and KUBERAY_SCHEMAS.joinpath("ray.io_rayjobs.yaml").is_file()
    ):
        return
    reason = (
        f"KubeRay CRD schemas not found under {KUBERAY_SCHEMAS} "
        "(expected <repo>/../shared/schemas/kuberay/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml)"
    )
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(reason + "; CI=true requires them")
    pytest.skip(reason)


def test_missing_shared_skips_locally_and_fails_on_ci(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "KUBERAY_SCHEMAS", tmp_path / "no-shared")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="KubeRay CRD schemas not found"):
        _require_shared()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _require_shared()


# --------------------------------------------------------------------------------------------
# CRD OpenAPI v3 schema -> strict JSON Schema
# --------------------------------------------------------------------------------------------

# ObjectMeta as a user writes it (the CRD leaves `metadata` as a bare object because the API
# server validates it itself). Server-populated fields are allowed but not needed.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        # KubeRay uses the name for Services, so it must be a DNS-1035 label.
        "name": {"type": "string", "maxLength": 63, "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
    },
}

_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def strict_schema(node: Any) -> Any:
    """Converts a Kubernetes structural schema into a JSON Schema that rejects unknown fields.

    - an object with `properties` and no `additionalProperties` gets `additionalProperties: false`
      (what the API server prunes, and `kubeconform -strict` / `kubectl --validate=strict` reject);
    - `x-kubernetes-preserve-unknown-fields: true` keeps that object open (its declared
      properties are still checked);
    - `x-kubernetes-int-or-string: true` means integer or string (anyOf added if missing;
      `pattern` then constrains only the string form, as in Kubernetes);
    - `nullable: true` also allows null;
    - an object with neither properties nor additionalProperties nor preserve-unknown-fields
      accepts only `{}` (the API server would drop anything inside it);
    - CEL rules (`x-kubernetes-validations`), list/map types, `default` and `format` are not
      evaluated; other `x-kubernetes-*` keys are dropped.
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not"):
            out[key] = strict_schema(value)
        elif key == "additionalProperties":
            out[key] = strict_schema(value) if isinstance(value, dict) else value
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [strict_schema(v) for v in value]
        elif key == "x-kubernetes-list-type" and value == "set":
            out["uniqueItems"] = True
        elif isinstance(key, str) and key.startswith("x-kubernetes-"):
            continue
        elif key in ("nullable", "description", "default", "example", "externalDocs"):
            continue
        else:
            out[key] = copy.deepcopy(value)

    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", copy.deepcopy(_INT_OR_STRING))

    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False

    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out


def crd_validator(crd_file: str, version: str = "v1"):
    crd = _load(KUBERAY_SCHEMAS / crd_file)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{crd_file}: no version {version} (has {sorted(versions)})"
    schema = strict_schema(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META_SCHEMA
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema.setdefault("required", [])
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata", "spec"})
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, doc: Any) -> list[str]:
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    )


@pytest.fixture(scope="module")
def raycluster_validator():
    _require_shared()
    return crd_validator("ray.io_rayclusters.yaml")


@pytest.fixture(scope="module")
def rayjob_validator():
    _require_shared()
    return crd_validator("ray.io_rayjobs.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _load(CLUSTER / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(CLUSTER / "rayjob.yaml")


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return _load(CLUSTER / "runtime_env.yaml")


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------


def test_raycluster_matches_crd_schema(raycluster_validator, raycluster):
    assert schema_errors(raycluster_validator, raycluster) == []


def test_rayjob_matches_crd_schema(rayjob_validator, rayjob):
    assert schema_errors(rayjob_validator, rayjob) == []


def _with(doc: dict, path: list, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


HEAD_CONTAINER = ["spec", "headGroupSpec", "template", "spec", "containers", 0]


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (["spec", "headGroupSpec", "rayStartParam"], {}, "rayStartParam"),  # typo of rayStartParams
        (["spec", "shutdownAfterJobFinishes"], True, "shutdownAfterJobFinishes"),  # RayJob-only
        (["spec", "workerGroupSpecs", 0, "gpus"], 1, "gpus"),
        ([*HEAD_CONTAINER, "imagePullPolicyy"], "Always", "imagePullPolicyy"),
        ([*HEAD_CONTAINER, "resources", "limits", "cpu"], [4], "cpu"),  # int-or-string only
        (["spec", "workerGroupSpecs", 0, "replicas"], "1", "replicas"),  # int32, not string
        (["spec", "authOptions", "mode"], "password", "mode"),  # enum
        (["metadata", "lables"], {"a": "b"}, "lables"),  # ObjectMeta is strict too
        (["metadata", "name"], "Diffurec_Cluster", "name"),
        (["apiVersion"], "ray.io/v1alpha2", "apiVersion"),
    ],
)
def test_raycluster_schema_rejects(raycluster_validator, raycluster, path, value, expect):
    errors = schema_errors(raycluster_validator, _with(raycluster, path, value))
    assert errors, f"setting {path} = {value!r} should be rejected"
    assert any(expect in e for e in errors), errors


def test_rayjob_schema_rejects_unknown_fields(rayjob_validator, rayjob):
    for path in (
        ["spec", "shutdownAfterJobFinish"],
        ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "tolerationz"],
        ["spec", "rayClusterSpec", "headGroupSpec", "template", "metadata", "labelz"],
    ):
        errors = schema_errors(rayjob_validator, _with(rayjob, path, True))
        assert any(path[-1] in e and "Additional properties" in e for e in errors), (path, errors)


def test_int_or_string_accepts_both_forms(raycluster_validator, raycluster):
    for value in (4, "4", "500m"):
        doc = _with(raycluster, [*HEAD_CONTAINER, "resources", "limits", "cpu"], value)
        assert schema_errors(raycluster_validator, doc) == [], value


def test_strict_schema_keeps_preserve_unknown_fields_open():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "open": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"n": {"type": "integer"}},
                },
                "closed": {"type": "object", "properties": {"n": {"type": "integer"}}},
                "port": {"x-kubernetes-int-or-string": True},
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"open": {"n": 1, "anything": {"x": [1]}}, "closed": {"n": 1}})
    assert not v.is_valid({"open": {"n": "one"}})  # declared properties still checked
    assert not v.is_valid({"closed": {"anything": 1}})
    assert not v.is_valid({"unknown": 1})
    assert v.is_valid({"port": 8080}) and v.is_valid({"port": "http"})
    assert not v.is_valid({"port": 1.5}) and not v.is_valid({"port": None})
    assert v.is_valid({"maybe": None}) and v.is_valid({"maybe": "x"})


def _images(cluster_spec: dict) -> dict[str, str]:
    images = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    for group in cluster_spec["workerGroupSpecs"]:
        images[group["groupName"]] = group["template"]["spec"]["containers"][0]["image"]
    return images


def _gpu_groups(cluster_spec: dict) -> list[dict]:
    return [
        g
        for g in cluster_spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_images_pinned_to_installed_ray(which, raycluster, rayjob):
    version = _ray_version()
    spec = raycluster["spec"] if which == "raycluster" else rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == version
    images = _images(spec)
    assert images["head"] == f"rayproject/ray:{version}-{PYTHON_TAG}", images
    gpu_groups = _gpu_groups(spec)
    assert gpu_groups, f"{which}: no worker group requests nvidia.com/gpu"
    for group in spec["workerGroupSpecs"]:
        suffix = "-gpu" if group in gpu_groups else ""
        assert images[group["groupName"]] == f"rayproject/ray:{version}-{PYTHON_TAG}{suffix}", images
    for group in gpu_groups:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"]
        assert group["maxReplicas"] >= group["minReplicas"] >= 0


def test_rayjob_runs_the_sweep_and_shuts_down(rayjob, raycluster, runtime_env):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    commands = pipeline_commands(spec["entrypoint"])
    tune = [args for script, args in commands if script == "tune"]
    assert tune, spec["entrypoint"]
    assert "--use-gpu" in tune[0] and "--workers-per-trial" in tune[0]
    assert _images(spec["rayClusterSpec"]) == _images(raycluster["spec"])
    # Same Python deps and env var names as cluster/runtime_env.yaml; the code comes from a
    # location the cluster can read (a RayJob cannot upload a local directory).
    job_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert job_env["pip"] == runtime_env["pip"]
    assert set(job_env["env_vars"]) == set(runtime_env["env_vars"])
    assert re.match(r"^(local|file|https|s3|gs)://", job_env["working_dir"]), job_env["working_dir"]


def test_shared_volume_claim_matches_manifests(raycluster, rayjob):
    pvc = _load(CLUSTER / "shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["apiVersion"] == "v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        pod_specs = [spec["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in spec["workerGroupSpecs"]
        ]
        for pod in pod_specs:
            claims = {
                v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert claims == {pvc["metadata"]["name"]}
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert {"/mnt/shared", "/home/ray/ray_results"} <= mounts


# --------------------------------------------------------------------------------------------
# Cluster launcher (AWS)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _launcher_validate(config: dict) -> dict:
    """What `ray up` checks before it talks to the cloud (ray/autoscaler/_private/commands.py
    _bootstrap_config): merge with the provider's defaults.yaml, then validate against
    ray/autoscaler/ray-schema.json plus Ray's cross-field checks. The AWS-specific steps after
    it (resource autodetection, IAM/VPC bootstrap) need credentials and are not run."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_launcher_config_is_valid(no_network):
    config = _load(CLUSTER / "aws-gpu.yaml")
    prepared = _launcher_validate(config)
    assert prepared["provider"]["type"] == "aws"

    version = _ray_version()
    docker = prepared["docker"]
    assert docker["head_image"] == f"rayproject/ray:{version}-{PYTHON_TAG}"
    assert docker["worker_image"] == f"rayproject/ray:{version}-{PYTHON_TAG}-gpu"

    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in node_types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for t in gpu_types.values():
        assert t["max_workers"] >= 1
    # Token auth is turned on explicitly on every node (workers never infer it).
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in prepared[key]), key


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("max_worker", 4),  # unknown top-level key
        lambda c: c["docker"].__setitem__("imagee", "x"),  # unknown docker key
        lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].__setitem__("GPU", "1"),
        lambda c: c.__setitem__("head_node_type", "ray.head.missing"),
        lambda c: c["available_node_types"]["ray.worker.gpu"].__setitem__("min_workers", 99),
    ],
    ids=["unknown-key", "unknown-docker-key", "gpu-as-string", "bad-head-type", "min-over-max"],
)
def test_aws_launcher_validation_rejects(no_network, mutate):
    config = _load(CLUSTER / "aws-gpu.yaml")
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _launcher_validate(config)


# --------------------------------------------------------------------------------------------
# runtime_env
# --------------------------------------------------------------------------------------------


def test_runtime_env_is_a_valid_ray_runtime_env(runtime_env):
    from ray.runtime_env import RuntimeEnv

    known = {"working_dir", "excludes", "pip", "env_vars", "py_modules", "config"}
    assert set(runtime_env) <= known, set(runtime_env) - known
    assert runtime_env["working_dir"] == "."
    assert RUNTIME_ENV_REQUIRED_EXCLUDES <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"].get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    RuntimeEnv(**runtime_env)  # Ray's own type checks (pip / env_vars / working_dir)


def test_runtime_env_pip_matches_pyproject(runtime_env):
    """The cluster installs the project's own pins (pyproject.toml [project] dependencies)."""
    import tomllib

    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml")
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]

    def name(req: str) -> str:
        return re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0].lower().replace("_", "-")

    pinned = {name(d): d.replace(" ", "") for d in deps}
    for req in runtime_env["pip"]["packages"]:
        assert name(req) in pinned, f"{req} is not a project dependency"
        assert req.replace(" ", "") == pinned[name(req)], f"{req} != pyproject's {pinned[name(req)]}"
    assert "ray" not in {name(r) for r in runtime_env["pip"]["packages"]}  # the image's Ray


def test_runtime_env_excludes_data_and_outputs(tmp_path, runtime_env):
    """Walk a fake working tree with Ray's own exclude matcher (the one `ray job submit` uses)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files = [
        "pipelines/tune.py",
        "diffurec/__init__.py",
        "tune_spaces/default.yaml",
        "cluster/runtime_env.yaml",
        "outputs/mlflow.db",
        ".venv/bin/python",
        "data/beauty/stats.json",
        "benchmarks/sample.parquet",
        ".git/HEAD",
        "diffurec/__pycache__/x.cpython-311.pyc",
        ".gpu/whl/ray-2.60.0-slim.whl",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    uploaded: set[str] = set()

    def handler(path: Path):
        if path.is_file():
            uploaded.add(path.relative_to(tmp_path).as_posix())

    _dir_travel(
        tmp_path, [_get_excludes(tmp_path, runtime_env["excludes"])], handler, include_gitignore=False
    )
    assert uploaded == {
        "pipelines/tune.py",
        "diffurec/__init__.py",
        "tune_spaces/default.yaml",
        "cluster/runtime_env.yaml",
    }


# --------------------------------------------------------------------------------------------
# Everything the files name exists; pipeline flags belong to the pipelines' CLI
# --------------------------------------------------------------------------------------------

_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<"}


def pipeline_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, args) for each `python pipelines/<script>.py ...` in shell text."""
    text = re.sub(r"(?m)^[ \t]*#+[ \t]?", "", text)  # commands quoted in comments count too
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0]
        try:
            tokens = shlex.split(line, comments=False)
        except ValueError:
            tokens = line.split()
        for i, tok in enumerate(tokens):
            m = re.fullmatch(r"pipelines/(\w+)\.py", tok)
            if not m or i == 0 or not re.search(r"python[\d.]*$", tokens[i - 1]):
                continue
            args = []
            for arg in tokens[i + 1 :]:
                if arg in _SHELL_OPERATORS:
                    break
                args.append(arg)
            found.append((m.group(1), args))
    return found


def _command_sources(rayjob: dict) -> dict[str, str]:
    sources = {"rayjob.yaml entrypoint": rayjob["spec"]["entrypoint"]}
    for path in sorted(CLUSTER.iterdir()):
        if path.is_file() and path.suffix in {".md", ".yaml", ".yml", ".sh"}:
            sources[path.name] = path.read_text()
    return sources


def test_referenced_files_exist(rayjob):
    """pipelines/*.py, tune_spaces/*.yaml and cluster/* named anywhere in cluster/ exist.

    tune_spaces/*.yaml and pipelines/*.py are written by other work items; this fails until
    they land."""
    pattern = re.compile(
        r"(?<![\w/.-])((?:pipelines/[\w-]+\.py)|(?:tune_spaces/[\w-]+\.ya?ml)|(?:cluster/[\w.-]+\.\w+))"
    )
    referenced: dict[str, set[str]] = {}
    for source, text in _command_sources(rayjob).items():
        for ref in pattern.findall(text):
            referenced.setdefault(ref, set()).add(source)
    assert "pipelines/tune.py" in referenced
    missing = {ref: sorted(src) for ref, src in referenced.items() if not (REPO / ref).is_file()}
    assert not missing, f"named but missing from the repo: {missing}"


def test_pipeline_flags_are_the_documented_cli(rayjob):
    used: list[tuple[str, str, str]] = []
    for source, text in _command_sources(rayjob).items():
        for script, args in pipeline_commands(text):
            assert script in PIPELINE_FLAGS, f"{source}: unknown pipeline {script}"
            for arg in args:
                if arg.startswith("--"):
                    used.append((source, script, arg.split("=", 1)[0]))
    assert any(script == "tune" for _, script, _ in used)
    bad = [u for u in used if u[2] not in PIPELINE_FLAGS[u[1]]]
    assert not bad, f"flags outside the pipelines' CLI: {bad}"
    # Where the pipeline already exists, it must define each flag used.
    for source, script, flag in used:
        path = REPO / "pipelines" / f"{script}.py"
        if path.is_file():
            assert flag in path.read_text(), f"{source}: {path.name} does not define {flag}"
