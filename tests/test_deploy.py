"""Deployment: the Dockerfile (hadolint + static checks) and the Helm chart (real helm + Kubernetes schemas)."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "uniguard"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.35.0"
# Kinds from CRDs that kubernetes-validate has no schema for (it ships only the core API). Everything else is
# validated strictly; these are checked structurally in test_full_values_features instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


# ----------------------------------------------------------------------------------------------------------- helm


@pytest.fixture(scope="session")
def helm() -> Path:
    """The real helm binary at tools/bin/helm (scripts/get_helm.sh fetches it when missing)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "get_helm.sh")], check=True, timeout=300)
    binary = ROOT / "tools" / "bin" / "helm"
    assert binary.is_file(), "scripts/get_helm.sh did not produce tools/bin/helm"
    return binary


def _helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)


def _render(helm: Path, *args: str) -> list[dict[str, Any]]:
    proc = _helm(helm, "template", "rel", str(CHART), "--namespace", "guard", *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "Deployment", "rel-uniguard")["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.fixture(scope="module")
def default_docs(helm: Path) -> list[dict[str, Any]]:
    return _render(helm)


@pytest.fixture(scope="module")
def full_docs(helm: Path) -> list[dict[str, Any]]:
    return _render(helm, "-f", str(FULL_VALUES))


@pytest.mark.parametrize("values", [[], ["-f", str(FULL_VALUES)]], ids=["default", "full"])
def test_helm_lint(helm: Path, values: list[str]) -> None:
    proc = _helm(helm, "lint", "--strict", str(CHART), *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def _validate_all(docs: list[dict[str, Any]]) -> list[str]:
    checked = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked.append(doc["kind"])
    return checked


def test_default_manifests_are_valid_kubernetes(default_docs: list[dict[str, Any]]) -> None:
    kinds = _validate_all(default_docs)
    assert sorted(kinds) == sorted(
        ["Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    )


def test_full_manifests_are_valid_kubernetes(full_docs: list[dict[str, Any]]) -> None:
    kinds = _validate_all(full_docs)
    expected = ["Deployment", "Deployment", "Service", "Service", "ServiceAccount", "HorizontalPodAutoscaler"]
    expected += ["PodDisruptionBudget", "ConfigMap", "Secret", "NetworkPolicy", "NetworkPolicy"]
    assert sorted(kinds) == sorted(expected)
    assert [d["kind"] for d in full_docs if (d["apiVersion"], d["kind"]) in CRD_KINDS] == ["ServiceMonitor"]


def test_validator_catches_a_broken_manifest(default_docs: list[dict[str, Any]]) -> None:
    """The strict schema check is live: an unknown field or a wrong type is rejected."""
    deployment = copy.deepcopy(_one(default_docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(_one(default_docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set-string", "replicaCount=two"], "/replicaCount"),
        (["--set", "config.provider=tpu"], "/config/provider"),
        (["--set", "config.failMode=maybe"], "/config/failMode"),
        (["--set-string", "config.playground=yes"], "/config/playground"),
        (["--set", "apiKeys.enabled=true", "--set", "apiKeys.hashes[0]=not-a-sha256"], "/apiKeys/hashes/0"),
        (["--set", "redis.url=http://cache:6379"], "/redis/url"),
        (["--set", "replicas=3"], "replicas"),
        (["--set", "terminationGracePeriodSeconds=8"], "terminationGracePeriodSeconds (8) must exceed"),
        (["--set", "config.extra.port=9000"], "config.extra.port"),
        (["--set", "apiKeys.enabled=true"], "apiKeys.enabled is true but"),
    ],
    ids=[
        "replicas-str",
        "provider",
        "fail-mode",
        "playground",
        "key-hash",
        "redis-url",
        "unknown-key",
        "grace",
        "extra",
        "keys",
    ],
)
def test_bad_values_fail_to_render(helm: Path, args: list[str], message: str) -> None:
    proc = _helm(helm, "template", "rel", str(CHART), *args)
    assert proc.returncode != 0, f"helm template accepted {args}"
    assert message in proc.stderr, proc.stderr
    if message.startswith("/") or message == "replicas":
        # Schema violations also fail `helm lint`; template `fail` checks do not (helm lint ignores `fail` on purpose).
        lint = _helm(helm, "lint", str(CHART), *args)
        assert lint.returncode != 0, f"helm lint accepted {args}"


def test_deployment_probes_and_shutdown(default_docs: list[dict[str, Any]]) -> None:
    from service.config import Settings

    container = _container(default_docs)
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    pod = _one(default_docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    # Grace period covers the preStop sleep plus the batcher's drain (bounded by the request deadline).
    env = _env(container)
    timeout = float(env["UNIGUARD_REQUEST_TIMEOUT_S"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + timeout
    assert timeout <= Settings.model_fields["request_timeout_s"].default
    hpa = _one(default_docs, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    assert "replicas" not in _one(default_docs, "Deployment")["spec"], "the HPA owns replicas"


def _settings_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's UNIGUARD_* environment with secret references resolved from the rendered Secrets."""
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    out = {}
    for name, value in _env(_container(docs)).items():
        if not name.startswith("UNIGUARD_"):
            continue
        if isinstance(value, dict):
            ref = value["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
        out[name] = value
    return out


@pytest.mark.parametrize("which", ["default_docs", "full_docs"])
def test_rendered_env_is_accepted_by_the_service_settings(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every UNIGUARD_* variable the chart sets is a real setting, and the service parses the values."""
    from service.config import ENV_PREFIX, Settings, load_settings

    docs = request.getfixturevalue(which)
    env = _settings_env(docs)
    env.pop("UNIGUARD_EXAMPLE_EXTRA", None)  # full-values shows a plain extraEnv entry; it is not a setting
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(env) <= known, f"the chart sets unknown settings: {sorted(set(env) - known)}"
    for name in known:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.host == "0.0.0.0"
    assert settings.request_timeout_s == float(env["UNIGUARD_REQUEST_TIMEOUT_S"])
    assert settings.playground is (which != "full_docs")  # on by default; full-values switches it off
    if which == "full_docs":
        assert settings.provider == "cuda"
        assert [str(p) for p in settings.policy_dirs] == ["/app/policies/custom"]
        assert len(settings.api_key_hashes) == 2
        assert settings.redis_url == "redis://rel-uniguard-redis:6379/0"
        assert settings.max_texts_per_request == 32


def test_full_values_features(full_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    from policies.registry import PolicyRegistry

    container = _container(full_docs)
    env = _env(container)
    # GPU: CUDA image, GPU limit, provider cuda, toleration.
    assert container["image"].endswith(":0.1.0-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["UNIGUARD_PROVIDER"] == "cuda"
    pod = _one(full_docs, "Deployment", "rel-uniguard")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # Custom policies: the ConfigMap is mounted where UNIGUARD_POLICY_DIRS points and the files load in the registry.
    configmap = _one(full_docs, "ConfigMap")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policies")
    assert env["UNIGUARD_POLICY_DIRS"] == mount["mountPath"]
    volume = next(v for v in pod["volumes"] if v["name"] == "policies")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    for file_name, text in configmap["data"].items():
        (tmp_path / file_name).write_text(text, encoding="utf-8")
    registry = PolicyRegistry.load([tmp_path])
    assert {"refund_fraud", "medical_dosage"} <= {p.name for p in registry}
    # API keys: a Secret of comma-separated sha256 hashes, referenced by the Deployment.
    secret = _one(full_docs, "Secret")
    ref = env["UNIGUARD_API_KEY_HASHES"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in secret["stringData"][ref["key"]].split(","))
    # Bundled Redis: Deployment + Service, the URL points at the Service, a NetworkPolicy admits only UniGuard pods.
    redis_service = _one(full_docs, "Service", "rel-uniguard-redis")
    assert env["UNIGUARD_REDIS_URL"] == f"redis://{redis_service['metadata']['name']}:6379/0"
    redis_deployment = _one(full_docs, "Deployment", "rel-uniguard-redis")
    assert redis_service["spec"]["selector"] == redis_deployment["spec"]["selector"]["matchLabels"]
    redis_netpol = _one(full_docs, "NetworkPolicy", "rel-uniguard-redis")
    server_labels = _one(full_docs, "Deployment", "rel-uniguard")["spec"]["selector"]["matchLabels"]
    assert redis_netpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == server_labels
    # HPA on CPU and on queue wait (prometheus-adapter Pods metric).
    hpa = _one(full_docs, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    metric = hpa["spec"]["metrics"][1]["pods"]["metric"]["name"]
    assert metric == "uniguard_queue_wait_seconds_avg"
    from service.metrics import Metrics

    # The adapter derives it from the service's histogram: that histogram must exist under this name.
    assert Metrics().queue_wait._name == metric.removesuffix("_avg")
    # ServiceMonitor (CRD, not schema-validated): scrapes the Service's http port on /metrics.
    monitor = _one(full_docs, "ServiceMonitor")
    endpoint = {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    assert monitor["spec"]["endpoints"][0] == endpoint
    assert monitor["spec"]["selector"]["matchLabels"] == _one(full_docs, "Service", "rel-uniguard")["spec"]["selector"]
    pdb = _one(full_docs, "PodDisruptionBudget")["spec"]
    assert pdb == {"minAvailable": 1, "selector": {"matchLabels": server_labels}}


def test_chart_values_cover_the_schema() -> None:
    """values.yaml validates against values.schema.json (defaults must never drift from the schema)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}
    assert set(values["config"]) == set(schema["properties"]["config"]["properties"])


# ----------------------------------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for every instruction; continuation lines joined, comments dropped."""
    lines: list[str] = []
    buffer = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        lines.append(buffer + stripped)
        buffer = ""
    out = []
    stage = "<global>"
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\sAS\s+(\S+)", line, re.IGNORECASE)
            stage = match.group(1) if match else rest
        out.append((stage, keyword, rest.strip()))
    return out


def _global_args() -> dict[str, str]:
    args = {}
    for stage, keyword, rest in _instructions():
        if stage == "<global>" and keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def _stage(name: str) -> list[tuple[str, str]]:
    return [(k, r) for s, k, r in _instructions() if s == name]


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything under a matched folder."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, p) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            excluded = not negate
    return excluded


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


SERVING_PACKAGES = ["uniguard", "policies", "export", "service"]  # and scoring/ once the repository has it


def test_dockerfile_copy_sources_exist_and_reach_the_build_context() -> None:
    args = _global_args()
    sources = []
    for _stage_name, keyword, rest in _instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        for source in words[:-1]:
            sources.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], source))
    assert "models/uniguard-minilm" in sources, "the default model must be baked into the image"
    assert "." in sources, "the sources stage copies the (allow-listed) build context"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist in the repository"
        if source != ".":
            assert not _dockerignore_excludes(source), f".dockerignore excludes {source}, which the Dockerfile copies"
    assert (ROOT / args["MODEL_DIR"] / "manifest.json").is_file(), "the baked-in model folder needs a manifest.json"
    # everything the service imports reaches the image: every project package that service/ imports is allowed
    imported: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        imported |= set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.MULTILINE))
    project = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {"service", "policies", "export"} <= imported & project
    for package in sorted(imported & project):
        assert not _dockerignore_excludes(f"{package}/__init__.py"), f"the service imports {package}: allow it"


def test_dockerignore_keeps_junk_out() -> None:
    for junk in [
        ".venv",
        ".git",
        "runs",
        "tests",
        "docs",
        ".pytest_cache",
        "service/__pycache__",
        "training",
        "training/data/x.jsonl",
        "merging/search.py",
        "policies/data.jsonl",
        "models/uniguard-minilm/checkpoint-3",
    ]:
        assert _dockerignore_excludes(junk), f".dockerignore should exclude {junk}"
    needed = [
        "pyproject.toml",
        "README.md",
        "service/app.py",
        "policies/default/toxicity.yaml",
        "models/uniguard-minilm",
    ]
    for path in [*needed, *(f"{p}/__init__.py" for p in SERVING_PACKAGES), "scoring/__init__.py"]:
        assert not _dockerignore_excludes(path), f".dockerignore must not exclude {path}"


def test_image_stage_is_lean_and_safe() -> None:
    """One final stage for both images; the runtime base (and with it the provider) is chosen by RUNTIME."""
    instructions = _stage("image")
    text = "\n".join(f"{k} {r}" for k, r in instructions)
    assert instructions[0] == ("FROM", "runtime-${RUNTIME} AS image")
    for forbidden in ["torch", "gcc", "build-essential", "g++", "pip install", "[train", "training", "merging"]:
        assert forbidden not in text, f"the image stage must not contain {forbidden!r}"
    users = [r for k, r in instructions if k == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the image must run as a non-root user"
    assert ("ENTRYPOINT", '["uniguard", "serve"]') in instructions, "exec-form ENTRYPOINT expected"
    env = " ".join(r for k, r in instructions if k == "ENV")
    assert "UNIGUARD_HOST=0.0.0.0" in env and "UNIGUARD_PORT=8000" in env
    healthchecks = [r for k, r in instructions if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0] and "urllib" in healthchecks[0]
    assert instructions[-1][0] == "ENTRYPOINT"
    # The default target (`docker build .`) is the image stage, on the CPU runtime.
    assert _instructions()[-1][0] == "image"
    args = _global_args()
    assert args["RUNTIME"] == "cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    for runtime in ("cpu", "cuda"):
        base = _stage(f"runtime-{runtime}")
        assert base, f"no runtime-{runtime} stage"
        assert f"UNIGUARD_PROVIDER={runtime}" in " ".join(r for k, r in base if k == "ENV")
    builder = "\n".join(r for k, r in _stage("builder") if k == "RUN")
    assert "onnxruntime-gpu" in builder and '"$RUNTIME" = "cuda"' in builder
    assert "find_spec" in builder and "'training'" in builder  # the build fails if training code got in
    # no stage repeats another's steps: only the runtime stages differ between the two images
    stages = [s for s, k, _ in _instructions() if k == "FROM"]
    assert stages == ["runtime-cpu", "runtime-cuda", "sources", "builder", "image"], stages


def test_serving_code_runs_without_training_and_merging(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the image holds is enough: `uniguard serve` starts and classifies with training/ and merging/ made
    unimportable (as in the image, where they are not copied)."""
    import httpx

    from service.localserver import LocalServer

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NotInImage:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('training', 'merging'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NotInImage())\n"
    )
    settings = {"PYTHONPATH": str(tmp_path), "UNIGUARD_REDIS_URL": "", "UNIGUARD_WARMUP_BATCHES": "1"}
    server = LocalServer(tiny_model_dir, settings=settings, log_path=tmp_path / "serve.log")
    with server:
        r = httpx.post(server.url + "/classify", json={"input": "hello", "policies": ["toxicity"]}, timeout=10)
        assert r.status_code == 200, r.text
    blocked = subprocess.run(
        [sys.executable, "-c", "import training"], env=server.env, capture_output=True, text=True, timeout=60
    )
    assert blocked.returncode != 0 and "No module named 'training'" in blocked.stderr, "the blocker did not work"


def test_entrypoint_command_runs_outside_the_image() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "uniguard"), "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--port" in proc.stdout and "--model" in proc.stdout


def test_healthcheck_and_probe_paths_are_real_routes(default_docs: list[dict[str, Any]]) -> None:
    """The Dockerfile HEALTHCHECK, the chart's probes and the ServiceMonitor hit routes the app really serves."""
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings())  # routes only; the lifespan (model load) does not run
    paths = set(app.openapi()["paths"])
    container = _container(default_docs)
    probe_paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    health = [r for _s, k, r in _instructions() if k == "HEALTHCHECK"]
    health_paths = {m for r in health for m in re.findall(r"(/[a-z]+)'", r)}
    assert health_paths == {"/healthz"}
    assert probe_paths | health_paths | {"/metrics"} <= paths, sorted(paths)
