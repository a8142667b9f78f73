"""The deployment files under compose/: valid, and consistent with genseg itself.

- compose/docker-compose.yml is validated by ``docker-compose config`` (Debian's Compose
  v1, offline, no engine needed). The binary is a requirement of the suite: without it
  these tests fail; ``scripts/ci-system-deps.sh`` installs it.
- every manifest under compose/k8s/ parses and has the Kubernetes shape.
- the facts that matter: workers reserve a GPU, their environment names are genseg's
  Settings (a renamed setting breaks this test), KEDA scales the right Deployment on the
  right consumer group and topic, and never past the partition count the topics are
  created with.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumers.runtime import RuntimeConfig
from plumbing.settings import Settings
from schemas import Topics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = COMPOSE_DIR / "k8s"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
DOCKERIGNORE = COMPOSE_DIR / "Dockerfile.dockerignore"

WORKERS = {"gen": "prompts", "seg": "images"}  # stage -> input topic (DESIGN.md)
#: Environment names in genseg's namespace: each must be a Settings alias, or a name the
#: code reads directly (GENSEG_XFORMERS, SD_MODEL_CONFIG...), so a typo or a rename fails.
SETTINGS_PREFIXES = ("KAFKA_", "GENSEG_", "SD_", "SAM_")
#: Settings every worker deployment sets explicitly (each must still be a Settings alias).
REQUIRED_SETTINGS = {
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "GENSEG_TOPIC_PREFIX",
    "GENSEG_BLOB_URL",
    "GENSEG_MODELS",
    "SD_MODEL",
    "SD_INPAINT_MODEL",
    "SAM_MODEL",
    "SAM_CHECKPOINT",
}
METRICS_PORT = 9400


# --- helpers ---------------------------------------------------------------------------


def settings_aliases() -> set[str]:
    aliases: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            aliases.add(alias)
        elif alias is not None:  # AliasChoices / AliasPath
            for choice in getattr(alias, "choices", [alias]):
                path = getattr(choice, "path", [choice])
                if path and isinstance(path[0], str):
                    aliases.add(path[0])
    return aliases


def env_names_read_by_code() -> set[str]:
    """Names in genseg's namespace that the code reads itself, e.g. ``_env_flag("X")``."""
    prefixes = "|".join(SETTINGS_PREFIXES)
    literal = re.compile(r"""["']((?:""" + prefixes + r""")[A-Z0-9_]+)["']""")
    names: set[str] = set()
    for package in _distribution_packages():
        for path in (ROOT / package).rglob("*.py"):
            names |= set(literal.findall(path.read_text(encoding="utf-8")))
    return names


def check_settings_env(env: dict[str, str], where: str) -> Settings:
    """Every genseg-looking name is known, the required settings are set, values validate."""
    aliases = settings_aliases()
    assert REQUIRED_SETTINGS <= aliases, f"renamed settings: {sorted(REQUIRED_SETTINGS - aliases)}"
    known = aliases | env_names_read_by_code()
    unknown = sorted(k for k in env if k.startswith(SETTINGS_PREFIXES) and k not in known)
    assert not unknown, f"{where}: not genseg settings (renamed?): {unknown}"
    missing = sorted((REQUIRED_SETTINGS | {"OTEL_EXPORTER_OTLP_ENDPOINT"}) - env.keys())
    assert not missing, f"{where}: missing {missing}"
    # model_validate reads only this mapping (not os.environ): the values as deployed.
    return Settings.model_validate({k: v for k, v in env.items() if k in aliases})


def option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return str(args[args.index(flag) + 1])


def seconds(duration: str | int | float) -> float:
    """Compose durations: ``90s``, ``2m``, ``1m30s``, or a number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


# --- docker compose --------------------------------------------------------------------


def _compose_env() -> dict[str, str]:
    # A clean environment, so the ${VAR:-default}s resolve to the file's defaults.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(COMPOSE_DIR)}


_MISSING_COMPOSE = (
    "docker-compose is not installed; it is a requirement of the test suite: "
    "run scripts/ci-system-deps.sh (as root) to install it"
)


def test_docker_compose_is_installed() -> None:
    # Fails, never skips: an unchecked compose file is how deployments rot.
    if shutil.which("docker-compose") is None:
        pytest.fail(_MISSING_COMPOSE, pytrace=False)


@pytest.fixture(scope="module")
def docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(_MISSING_COMPOSE, pytrace=False)
    return binary


@pytest.fixture(scope="module")
def compose(docker_compose: str) -> dict[str, Any]:
    """The compose file as Compose resolves it (anchors merged, defaults interpolated)."""
    result = subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        env=_compose_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_config_is_valid(docker_compose: str) -> None:
    result = subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        env=_compose_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "topics", "minio", "minio-bucket", "jaeger", "prometheus"} <= set(services)
    assert set(WORKERS) <= set(services)


def test_compose_kafka_is_kraft_and_reachable_by_name(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "healthcheck" in kafka
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    for name in ["topics", *WORKERS]:
        bootstrap = compose["services"][name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
        assert any(a.endswith(f"//{bootstrap}") for a in advertised), (name, advertised)


def test_compose_topics_job(compose: dict[str, Any]) -> None:
    topics = compose["services"]["topics"]
    assert topics["command"][:2] == ["topics", "create"]
    assert int(option(topics["command"], "--partitions")) >= 1
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics.get("restart", "no") == "no"


@pytest.mark.parametrize("stage", sorted(WORKERS))
def test_compose_worker(compose: dict[str, Any], stage: str) -> None:
    service = compose["services"][stage]
    assert service["command"][:2] == ["worker", stage]
    assert int(option(service["command"], "--metrics-port")) == METRICS_PORT

    # A GPU per container, in the form Compose v1.28+ and v2 both honour.
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == 1
        for d in devices
    ), devices

    # `--scale` needs no fixed name and no host port per replica.
    assert "container_name" not in service
    assert not service.get("ports"), "workers must not publish host ports (breaks --scale)"
    assert str(METRICS_PORT) in [str(p) for p in service.get("expose", [])]

    # Ordered start: topics exist (right partition count) and the bucket exists first.
    depends = service["depends_on"]
    assert depends["topics"]["condition"] == "service_completed_successfully"
    assert depends["minio-bucket"]["condition"] == "service_completed_successfully"
    assert depends["kafka"]["condition"] == "service_healthy"
    assert str(METRICS_PORT) in " ".join(service["healthcheck"]["test"])

    # The grace period outlasts the runtime's drain on SIGTERM.
    assert seconds(service["stop_grace_period"]) > RuntimeConfig().drain_timeout_s

    env = {k: str(v) for k, v in service["environment"].items()}
    settings = check_settings_env(env, f"compose service {stage}")
    assert settings.models == "pretrained"
    assert settings.sam_model == "vit_h"
    assert settings.blob_url == "s3://genseg/blobs"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # The SAM checkpoint lies on a mounted volume.
    targets = [str(v).split(":")[1] for v in service["volumes"]]
    assert any(settings.sam_checkpoint.startswith(t.rstrip("/") + "/") for t in targets)


def test_compose_gateway(compose: dict[str, Any]) -> None:
    """The HTTP gateway: `genseg serve` on 0.0.0.0:8080 in the container, published on the
    host's loopback only, ready when /readyz answers, on the workers' broker and blobs."""
    service = compose["services"]["gateway"]
    assert service["command"] == ["serve", "--listen", "0.0.0.0:8080"]
    assert "deploy" not in service, "the gateway needs no GPU"
    published = [str(p) for p in service.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    assert any(p.split(":")[-1].split("/")[0] == "8080" for p in published), published
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert ":8080/" in " ".join(service["healthcheck"]["test"])
    depends = service["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["topics"]["condition"] == "service_completed_successfully"
    assert depends["minio-bucket"]["condition"] == "service_completed_successfully"

    env = {k: str(v) for k, v in service["environment"].items()}
    settings = check_settings_env(env, "compose service gateway")
    workers = check_settings_env(
        {k: str(v) for k, v in compose["services"]["gen"]["environment"].items()}, "gen"
    )
    # The gateway reads the blobs the workers write, from the topics they use.
    assert settings.blob_url == workers.blob_url
    assert settings.kafka_bootstrap_servers == workers.kafka_bootstrap_servers
    assert settings.topic_prefix == workers.topic_prefix


def test_compose_object_store_bucket_matches_blob_url(compose: dict[str, Any]) -> None:
    services = compose["services"]
    bucket_job = services["minio-bucket"]
    assert bucket_job["depends_on"]["minio"]["condition"] == "service_healthy"
    bucket = services["gen"]["environment"]["GENSEG_BLOB_URL"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(bucket_job["command"])


def test_compose_tracing_and_metrics(compose: dict[str, Any]) -> None:
    services = compose["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]).lower() == "true"

    prometheus = services["prometheus"]
    mounts = [str(v) for v in prometheus["volumes"]]
    assert any(m.endswith(":/etc/prometheus/prometheus.yml:ro") for m in mounts), mounts
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    scraped: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped |= {(name, sd["port"]) for name in sd["names"]}
    assert {(stage, METRICS_PORT) for stage in WORKERS} <= scraped


# --- Dockerfile ------------------------------------------------------------------------


def _distribution_packages() -> list[str]:
    """Top-level packages that pyproject's package discovery puts into the distribution."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    names = sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file()
        and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns)
    )
    assert names
    return names


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base, "the base image is a build argument"
    assert re.fullmatch(r"nvidia/cuda:\S+-cudnn-runtime-ubuntu22\.04|pytorch/pytorch:\S+", base[1])
    assert 'ENTRYPOINT ["genseg"]' in instructions
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as non-root"
    assert "--extra gpu" in text or ".[gpu]" in text, "installs the gpu extra (xFormers)"
    assert "EXPOSE 9400" in instructions

    # Every package of the distribution is copied in and let through the .dockerignore.
    ignore = DOCKERIGNORE.read_text().split()
    for package in _distribution_packages():
        assert re.search(rf"^COPY {package} ", text, re.M), f"Dockerfile does not copy {package}"
        assert f"!{package}/" in ignore, f"{DOCKERIGNORE.name} does not allow {package}/"
    assert "!pyproject.toml" in ignore


# --- Kubernetes ------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    files = sorted([*K8S_DIR.glob("*.yaml"), *K8S_DIR.glob("*.yml")])
    assert files, "no manifests under compose/k8s/"
    return files


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append({**doc, "__file__": path.name})
    return docs


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def test_k8s_manifests_have_kubernetes_shape(manifests: list[dict[str, Any]]) -> None:
    seen: set[tuple[str, str]] = set()
    for doc in manifests:
        where = doc["__file__"]
        api = doc.get("apiVersion")
        assert isinstance(api, str) and re.fullmatch(r"([a-z0-9.-]+/)?v\d+\w*", api), where
        assert isinstance(doc.get("kind"), str) and doc["kind"], where
        assert isinstance(doc.get("metadata"), dict), where
        name = doc["metadata"].get("name")
        assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), (
            where,
            name,
        )
        key = (doc["kind"], name)
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"].get("namespace") == "genseg", where


def test_k8s_kustomization_lists_every_manifest(manifests: list[dict[str, Any]]) -> None:
    (kustomization,) = by_kind(manifests, "Kustomization").values()
    listed = set(kustomization["resources"])
    others = {p.name for p in _manifest_files()} - {"kustomization.yaml"}
    # The Secret is a template with placeholders: applying it would overwrite the real one.
    assert listed == others - {"secret.template.yaml"}


@pytest.fixture(scope="module")
def k8s_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    config = by_kind(manifests, "ConfigMap")["genseg-config"]["data"]
    secret = by_kind(manifests, "Secret")["genseg-secrets"]
    assert "data" not in secret, "the template holds placeholders in stringData, nothing else"
    assert all(v == "CHANGE_ME" for v in secret["stringData"].values()), "placeholders only"
    return {**config, **secret["stringData"]}


def _containers(deployment: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers" if init else "containers", [])


def _worker_deployments(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """stage -> the Deployment whose main container runs ``genseg worker <stage>``."""
    found: dict[str, dict[str, Any]] = {}
    for deployment in by_kind(manifests, "Deployment").values():
        for container in _containers(deployment):
            args = [str(a) for a in container.get("args", [])]
            if args[:1] == ["worker"]:
                found[args[1]] = deployment
    assert set(found) == set(WORKERS), found.keys()
    return found


def _topic_partitions(manifests: list[dict[str, Any]]) -> set[int]:
    """The --partitions of every `genseg topics create` (the Job and init containers)."""
    counts: set[int] = set()
    for doc in manifests:
        if doc["kind"] not in ("Job", "Deployment"):
            continue
        for container in _containers(doc) + _containers(doc, init=True):
            args = [str(a) for a in container.get("args", [])]
            if args[:2] == ["topics", "create"]:
                counts.add(int(option(args, "--partitions")))
    return counts


def test_k8s_topics_job(manifests: list[dict[str, Any]]) -> None:
    (job,) = by_kind(manifests, "Job").values()
    (container,) = _containers(job)
    assert [str(a) for a in container["args"]][:2] == ["topics", "create"]
    assert len(_topic_partitions(manifests)) == 1, "one partition count everywhere"


def test_k8s_env_names_are_settings(
    manifests: list[dict[str, Any]], k8s_env: dict[str, str]
) -> None:
    settings = check_settings_env(k8s_env, "genseg-config + genseg-secrets")
    assert settings.models == "pretrained"
    assert settings.sam_model == "vit_h"
    assert settings.blob_url.startswith("s3://")
    for stage, deployment in _worker_deployments(manifests).items():
        for container in _containers(deployment) + _containers(deployment, init=True):
            names = {e["name"] for e in container.get("env", [])}
            known = settings_aliases() | env_names_read_by_code()
            unknown = {n for n in names if n.startswith(SETTINGS_PREFIXES)} - known
            assert not unknown, (stage, unknown)
            refs = {
                ref.get("configMapRef", ref.get("secretRef", {})).get("name")
                for ref in container.get("envFrom", [])
            }
            assert {"genseg-config", "genseg-secrets"} <= refs, (stage, container["name"])


@pytest.mark.parametrize("stage", sorted(WORKERS))
def test_k8s_worker_deployment(manifests: list[dict[str, Any]], stage: str) -> None:
    deployment = _worker_deployments(manifests)[stage]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    (worker,) = _containers(deployment)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1

    port = int(option([str(a) for a in worker["args"]], "--metrics-port"))
    assert port == METRICS_PORT
    named_ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        target = worker[probe]["httpGet"]["port"]
        assert named_ports.get(target, target) == port, probe

    assert pod["terminationGracePeriodSeconds"] > RuntimeConfig().drain_timeout_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The topics exist with the intended partition count before the worker starts.
    init_args = [[str(a) for a in c["args"]][:2] for c in _containers(deployment, init=True)]
    assert ["topics", "create"] in init_args


@pytest.mark.parametrize("stage", sorted(WORKERS))
def test_k8s_keda_scales_on_consumer_group_lag(
    manifests: list[dict[str, Any]], k8s_env: dict[str, str], stage: str
) -> None:
    settings = check_settings_env(k8s_env, "genseg-config + genseg-secrets")
    deployment = _worker_deployments(manifests)[stage]
    scaled = [
        s
        for s in by_kind(manifests, "ScaledObject").values()
        if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    ]
    assert len(scaled) == 1, f"one ScaledObject targets {deployment['metadata']['name']}"
    spec = scaled[0]["spec"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["scaleTargetRef"].get("apiVersion", "apps/v1") == "apps/v1"

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # The CRD types trigger metadata as a map of strings: "2", "false", never 2 or false.
    assert all(isinstance(v, str) for v in meta.values()), meta
    topics = Topics(settings.topic_prefix)
    assert meta["consumerGroup"] == f"{settings.topic_prefix}.{stage}"
    assert meta["topic"] == topics.name(WORKERS[stage])
    assert meta["bootstrapServers"] == settings.kafka_bootstrap_servers
    assert int(meta["lagThreshold"]) >= 1
    # The workers' consumers start at the earliest offset (consumers/runtime.py).
    assert meta["offsetResetPolicy"] == "earliest"

    # Same security as the workers.
    protocol = settings.kafka_security_protocol
    assert (meta.get("tls") == "enable") == (protocol in ("SSL", "SASL_SSL"))
    if protocol.startswith("SASL"):
        keda_sasl = {
            "PLAIN": "plaintext",
            "SCRAM-SHA-256": "scram_sha256",
            "SCRAM-SHA-512": "scram_sha512",
        }
        assert meta["sasl"] == keda_sasl[settings.kafka_sasl_mechanism or "PLAIN"]
        auth = by_kind(manifests, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
        params = {r["parameter"]: r["key"] for r in auth["spec"]["secretTargetRef"]}
        assert params["username"] == "KAFKA_SASL_USERNAME"
        assert params["password"] == "KAFKA_SASL_PASSWORD"

    # Partitions are the ceiling of a group's parallelism: never more replicas than that.
    (partitions,) = _topic_partitions(manifests)
    assert spec["maxReplicaCount"] == partitions
    assert spec["minReplicaCount"] in (0, 1)
    assert str(meta.get("allowIdleConsumers", "false")).lower() == "false"


def test_gen_scales_on_a_small_lag_threshold(manifests: list[dict[str, Any]]) -> None:
    deployment = _worker_deployments(manifests)["gen"]
    (scaled,) = [
        s
        for s in by_kind(manifests, "ScaledObject").values()
        if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    ]
    # A prompt is seconds of GPU time: a deep backlog per replica is latency, not savings.
    assert int(scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"]) <= 4


def test_compose_webhook_dispatcher(compose: dict[str, Any]) -> None:
    """The webhook dispatcher: `genseg worker webhook`, opt-in (it needs a signing key),
    metrics for Prometheus, no GPU, started after the topics exist."""
    service = compose["services"]["webhook"]
    assert service["command"][:2] == ["worker", "webhook"]
    assert int(option(service["command"], "--metrics-port")) == METRICS_PORT
    assert service.get("profiles") == ["webhooks"]
    assert "deploy" not in service, "the dispatcher needs no GPU"
    assert not service.get("ports")
    env = {k: str(v) for k, v in service["environment"].items()}
    assert "GENSEG_WEBHOOK_SECRET" in env and "GENSEG_WEBHOOK_ALLOW" in env
    assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert seconds(service["stop_grace_period"]) > 60, "a delivery may take up to 60 s"
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert {"genseg-webhook", "genseg-gateway"} <= jobs
