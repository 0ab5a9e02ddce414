"""Offline validation of the deployment files: schemas and consistency with the code.

Each ``*_problems`` function returns a list of one-line problems (empty: all good), so the
tests can assert both that the real files pass and that a deliberately broken copy fails.
``python -m tests.deploy.checks`` runs them all (scripts/validate-deploy.sh calls it).

What is checked against what:

* docker-compose.yml against the Compose specification's JSON schema (schemas/).
* every Kubernetes manifest, after rendering each overlay (tests/deploy/kustomize.py),
  against the Kubernetes OpenAPI schemas of ``kubernetes-validate`` in strict mode, for
  each version in ``K8S_VERSIONS``; KEDA's ScaledObject against schemas/keda-scaledobject.json.
* the variables, commands and ports in both against ``worker.core.settings`` (the variables and
  their parsers), pyproject's console scripts and the command-line contract.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml

from tests.deploy.kustomize import Resource, render, resource_id

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
SECRET_TEMPLATE = K8S_DIR / "secret.template.yaml"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# The oldest Kubernetes minor we support and a recent one.
K8S_VERSIONS = ("1.30.0", "1.33.0")

CONFIGMAP_NAME = "ichvol-config"
SECRET_NAME = "ichvol-secrets"
WORKER_DEPLOYMENT = "ichvol-worker"
SCHEDULER_DEPLOYMENT = "ichvol-scheduler"
FLOWER_PORT = 5555
GPU_RESOURCE = "nvidia.com/gpu"

# What every worker and scheduler must be told (not left to a localhost default).
REQUIRED_VARIABLES = frozenset(
    {
        "ICHVOL_DATABASE_URL",
        "ICHVOL_BROKER_URL",
        "ICHVOL_QUEUE",
        "ICHVOL_S3_ENDPOINT_URL",
        "ICHVOL_EXPORT_BUCKET",
        "ICHVOL_RESULTS_BUCKET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "ICHVOL_SOFT_TIME_LIMIT_S",
        "ICHVOL_HARD_TIME_LIMIT_S",
    }
)
# The secrets the Secret template must carry.
SECRET_VARIABLES = frozenset(
    {
        "ICHVOL_DATABASE_URL",
        "ICHVOL_BROKER_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "ICHVOL_PACS_TOKEN",
        "ICHVOL_PACS_USERNAME",
        "ICHVOL_PACS_PASSWORD",
    }
)

# The command-line contract (docs/deployment.md).
WORKER_ARGV = (
    "celery",
    "-A",
    "worker",
    "worker",
    "--loglevel=INFO",
    "--queues={queue}",
    "--concurrency=1",
    "--pool=prefork",
    "--hostname=worker@%h",
)
WORKER_PING = "celery -A worker inspect ping -d worker@$HOSTNAME --timeout 10"
SCHEDULER_ARGV = ("ichvol", "scheduler")
MIGRATE_ARGV = ("alembic", "upgrade", "head")
FLOWER_ARGV = ("celery", "-A", "worker", "flower", f"--port={FLOWER_PORT}")
CHECK_ARGV = ("ichvol", "check")


# --------------------------------------------------------------------------- the code's side


@cache
def settings_variables() -> dict[str, dict[str, Any]]:
    """Every environment variable of worker/core/settings.py: env -> row (+ ``secret``)."""
    from worker.core.settings import Settings, settings_fields

    secret = {f.metadata["env"]: bool(f.metadata.get("secret")) for f in dataclasses.fields(Settings)}
    return {row["env"]: {**row, "secret": secret[row["env"]]} for row in settings_fields()}


def settings_default(env: str) -> Any:
    return settings_variables()[env]["default"]


def settings_problems(environ: Mapping[str, str], *, where: str) -> list[str]:
    """Whether the values parse: ``Settings.from_env`` is what the containers will run."""
    from worker.core.errors import ConfigurationError
    from worker.core.settings import Settings

    try:
        Settings.from_env(dict(environ))
    except ConfigurationError as exc:
        return [f"{where}: settings do not parse: {exc}"]
    return []


@cache
def pyproject() -> dict[str, Any]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def package_version() -> str:
    return str(pyproject()["project"]["version"])


def console_scripts() -> dict[str, str]:
    return dict(pyproject()["project"].get("scripts", {}))


# --------------------------------------------------------------------------- compose


@cache
def compose_schema() -> dict[str, Any]:
    with (SCHEMA_DIR / "compose-spec.json").open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def compose_schema_problems(data: Any) -> list[str]:
    """Validation errors of a compose document against the Compose specification's schema."""
    # The file says draft 2019-09 (with a trailing `#` that jsonschema does not recognise).
    validator = jsonschema.Draft201909Validator(compose_schema())
    return [
        f"compose: {'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    ]


_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


#: What an operator's ``.env`` provides: the stack's passwords are required variables
#: (``${VAR:?...}``) with no value committed anywhere, so the checks supply stand-ins.
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "pg-test-password",
    "MINIO_ROOT_USER": "minio-test-user",
    "MINIO_ROOT_PASSWORD": "minio-test-password",
}
#: Variables that carry credentials in docker-compose.yml: each must be required, never defaulted.
COMPOSE_CREDENTIALS = ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


def interpolate(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``.

    ``environ`` stands for the host environment / ``.env`` file (default: :data:`COMPOSE_ENV`,
    the operator's required credentials, otherwise the file's own defaults are what is
    checked). ``${VAR:?message}`` without a value raises.
    """
    env = COMPOSE_ENV if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        expression = match.group("braced")
        found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", expression, flags=re.DOTALL)
        if not found:
            raise ValueError(f"invalid interpolation ${{{expression}}}")
        name, operator, argument = found.groups()
        value = env.get(name)
        if operator in (":-", ":?") and value == "":
            value = None
        if value is not None:
            return value
        if operator in (":?", "?"):
            raise ValueError(f"required variable {name} is not set: {argument}")
        return argument if operator in (":-", "-") else ""

    return _INTERPOLATION.sub(substitute, text)


def referenced_variables(text: str) -> set[str]:
    """Variable names a compose string reads: from the host (``${X}``) or in the container (``$$X``)."""
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    names |= set(re.findall(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    names |= set(re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text))
    return names


def compose_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment after interpolation with the file's defaults (map or list form)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(key): interpolate(str(value)) if value is not None else "" for key, value in raw.items()}


def compose_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(interpolate(value))
    return [interpolate(str(item)) for item in value]


def runs_ichvol(service: Mapping[str, Any]) -> bool:
    """Whether the service runs one of our images (built here)."""
    return "build" in service or str(service.get("image", "")).startswith("ichvol-")


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _parse_duration_s(text: str) -> float:
    """Compose durations: ``780s``, ``13m``, ``1h2m3s``, ``1m30s`` (units us, ms, s, m, h)."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(amount) * units[unit] for amount, unit in parts)


def compose_problems(compose: Mapping[str, Any]) -> list[str]:
    """Consistency of docker-compose.yml with the settings, the commands and itself."""
    problems: list[str] = []
    known = settings_variables()
    services: dict[str, Any] = dict(compose.get("services") or {})

    # Every ICHVOL_* name anywhere in the file is a declared setting.
    for text in _strings(compose):
        for name in referenced_variables(text) | set(re.findall(r"\bICHVOL_[A-Z0-9_]+", text)):
            if name.startswith("ICHVOL_") and name not in known:
                problems.append(f"compose: {name} is not a variable of worker/core/settings.py")

    ours = {name: svc for name, svc in services.items() if runs_ichvol(svc)}
    for name, svc in ours.items():
        env = compose_environment(svc)
        for var in sorted(set(env) - set(known)):
            problems.append(f"compose: service {name} sets {var}, which is not a variable of worker/core/settings.py")
        problems += settings_problems(env, where=f"compose service {name}")

    roles = _compose_roles(ours)
    for role in ("worker", "scheduler", "migrate", "flower"):
        if role not in roles:
            problems.append(f"compose: no service runs the {role} command")

    for role in ("worker", "scheduler"):
        if role in roles:
            env = compose_environment(services[roles[role]])
            for var in sorted(REQUIRED_VARIABLES - set(env)):
                problems.append(f"compose: service {roles[role]} ({role}) does not set {var}")

    if "worker" in roles:
        name = roles["worker"]
        svc = services[name]
        env = compose_environment(svc)
        queue = env.get("ICHVOL_QUEUE", settings_default("ICHVOL_QUEUE"))
        problems += worker_argv_problems(compose_argv(svc.get("command")), queue=queue, where=f"compose {name}")
        hard_s = float(env.get("ICHVOL_HARD_TIME_LIMIT_S", settings_default("ICHVOL_HARD_TIME_LIMIT_S")))
        grace = svc.get("stop_grace_period")
        if grace is None or _parse_duration_s(str(grace)) <= hard_s:
            problems.append(f"compose: {name} stop_grace_period {grace} is not above the hard time limit {hard_s} s")
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        if not any("gpu" in (device.get("capabilities") or []) for device in devices):
            problems.append(f"compose: {name} reserves no GPU (deploy.resources.reservations.devices)")
        test = _healthcheck_text(svc)
        if WORKER_PING.replace("$HOSTNAME", "$$HOSTNAME") not in test:
            problems.append(f"compose: {name} health check is not `{WORKER_PING}`")

    if "flower" in roles:
        svc = services[roles["flower"]]
        published = [str(p) for p in svc.get("ports") or []]
        if not any(p.endswith(f":{FLOWER_PORT}") for p in published):
            problems.append(f"compose: flower does not publish port {FLOWER_PORT}")
        if f":{FLOWER_PORT}/" not in _healthcheck_text(svc):
            problems.append(f"compose: flower health check does not ask port {FLOWER_PORT}")
    if "scheduler" in roles and list(CHECK_ARGV) != _healthcheck_argv(services[roles["scheduler"]])[:2]:
        problems.append("compose: the scheduler health check is not `ichvol check`")

    problems += _compose_health_problems(services)
    problems += _compose_wiring_problems(services)
    problems += _compose_image_problems(services)
    return problems


def _compose_roles(services: Mapping[str, Any]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for name, svc in services.items():
        argv = compose_argv(svc.get("command"))
        if tuple(argv[:4]) == WORKER_ARGV[:4]:
            roles["worker"] = name
        elif tuple(argv) == SCHEDULER_ARGV:
            roles["scheduler"] = name
        elif tuple(argv) == MIGRATE_ARGV:
            roles["migrate"] = name
        elif tuple(argv) == FLOWER_ARGV:
            roles["flower"] = name
    return roles


def _healthcheck_argv(service: Mapping[str, Any]) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
        return [str(item) for item in test[1:]]
    return []


def _healthcheck_text(service: Mapping[str, Any]) -> str:
    return " ".join(_healthcheck_argv(service))


def _one_shot(service: Mapping[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def _compose_health_problems(services: Mapping[str, Any]) -> list[str]:
    """Long-running services have a health check; dependants wait for health or completion."""
    problems = []
    for name, svc in services.items():
        health = svc.get("healthcheck") or {}
        if not _one_shot(svc) and (not health.get("test") or health.get("disable")):
            problems.append(f"compose: service {name} has no health check")
        for dep, spec in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            if dep not in services:
                problems.append(f"compose: {name} depends on unknown service {dep}")
                continue
            wanted = "service_completed_successfully" if _one_shot(services[dep]) else "service_healthy"
            if (spec or {}).get("condition") != wanted:
                problems.append(f"compose: {name} should wait for {dep} with condition {wanted}")
        if isinstance(svc.get("depends_on"), list):
            problems.append(f"compose: {name} depends_on without conditions (start order only, not health)")
    return problems


def _compose_wiring_problems(services: Mapping[str, Any]) -> list[str]:
    """The URLs and credentials in the ichvol environment match the services they name."""
    problems: list[str] = []
    ichvol = next((svc for svc in services.values() if runs_ichvol(svc)), None)
    if ichvol is None:
        return ["compose: no service runs an ichvol image"]
    env = compose_environment(ichvol)

    db = urlsplit(env.get("ICHVOL_DATABASE_URL", ""))
    pg = next(((n, s) for n, s in services.items() if str(s.get("image", "")).startswith("postgres:")), None)
    if pg is None:
        problems.append("compose: no postgres service")
    else:
        pg_env = compose_environment(pg[1])
        expected = (
            pg[0],
            5432,
            pg_env.get("POSTGRES_USER"),
            pg_env.get("POSTGRES_PASSWORD"),
            pg_env.get("POSTGRES_DB"),
        )
        actual = (db.hostname, db.port, db.username, db.password, db.path.lstrip("/"))
        if expected != actual:
            problems.append(f"compose: ICHVOL_DATABASE_URL {actual} does not match service {pg[0]} {expected}")

    broker = urlsplit(env.get("ICHVOL_BROKER_URL", ""))
    redis_name = next((n for n, s in services.items() if str(s.get("image", "")).startswith("redis:")), None)
    if (broker.scheme, broker.hostname, broker.port) != ("redis", redis_name, 6379):
        problems.append(f"compose: ICHVOL_BROKER_URL does not point at service {redis_name} port 6379")

    s3 = urlsplit(env.get("ICHVOL_S3_ENDPOINT_URL", ""))
    minio = next(((n, s) for n, s in services.items() if "minio/minio:" in str(s.get("image", ""))), None)
    if minio is None:
        problems.append("compose: no MinIO service")
    else:
        minio_env = compose_environment(minio[1])
        if (s3.hostname, s3.port) != (minio[0], 9000):
            problems.append(f"compose: ICHVOL_S3_ENDPOINT_URL does not point at service {minio[0]} port 9000")
        credentials = (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"))
        if credentials != (minio_env.get("MINIO_ROOT_USER"), minio_env.get("MINIO_ROOT_PASSWORD")):
            problems.append("compose: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY do not match MinIO's root credentials")

    makers = [s for s in services.values() if "minio/mc:" in str(s.get("image", ""))]
    script = " ".join(" ".join(compose_argv(s.get("command"))) for s in makers)
    for var in ("ICHVOL_EXPORT_BUCKET", "ICHVOL_RESULTS_BUCKET"):
        if f"${var}" not in script or any(compose_environment(s).get(var) != env.get(var) for s in makers):
            problems.append(f"compose: no one-shot service creates the bucket named by {var}")
    return problems


def _compose_image_problems(services: Mapping[str, Any]) -> list[str]:
    problems = []
    for name, svc in services.items():
        image = str(svc.get("image", ""))
        problems += image_pin_problems(image, where=f"compose service {name}")
        if runs_ichvol(svc):
            tag = image.rpartition(":")[2]
            if tag != package_version():
                problems.append(f"compose: {name} image tag {tag!r} is not the package version {package_version()}")
            dockerfile = (svc.get("build") or {}).get("dockerfile")
            if dockerfile and not (REPO_ROOT / dockerfile).is_file():
                problems.append(f"compose: {name} builds from missing {dockerfile}")
    return problems


def image_pin_problems(image: str, *, where: str) -> list[str]:
    """A third-party image must carry a version tag (or digest), never none or ``latest``."""
    if "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or tag in ("", "latest") or not re.search(r"\d", tag):
        return [f"{where}: image {image!r} is not pinned to a version"]
    return []


# --------------------------------------------------------------------------- Kubernetes


@cache
def keda_schema() -> dict[str, Any]:
    with (SCHEMA_DIR / "keda-scaledobject.json").open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): keda_schema}


def k8s_schema_problems(resource: Resource, *, version: str) -> list[str]:
    """Strict validation of one manifest against Kubernetes ``version`` (or our CRD schema)."""
    where = "/".join(resource_id(resource)[1:]) or "<resource>"
    crd = CRD_SCHEMAS.get((str(resource.get("apiVersion")), str(resource.get("kind"))))
    if crd is not None:
        validator = jsonschema.Draft202012Validator(crd())
        return [
            f"{where}: {'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in validator.iter_errors(resource)
        ]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "<root>"
        return [f"{where} (k8s {version}): {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message} (a custom resource needs a schema in tests/deploy/schemas)"]
    return []


def render_overlay(name: str) -> list[Resource]:
    return render(OVERLAYS_DIR / name)


def overlay_names() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def load_secret_template() -> Resource:
    data = load_yaml(SECRET_TEMPLATE)
    assert isinstance(data, dict)
    return data


def find(resources: Iterable[Resource], kind: str, name: str) -> Resource | None:
    for resource in resources:
        if resource.get("kind") == kind and (resource.get("metadata") or {}).get("name") == name:
            return resource
    return None


def pod_spec(resource: Resource) -> dict[str, Any] | None:
    spec = resource.get("spec") or {}
    if resource.get("kind") == "Pod":
        return dict(spec)
    if resource.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    template = spec.get("template")
    return dict(template.get("spec") or {}) if isinstance(template, dict) else None


def pod_labels(resource: Resource) -> dict[str, str]:
    template = (resource.get("spec") or {}).get("template") or {}
    return dict((template.get("metadata") or {}).get("labels") or {})


def all_containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def container_argv(container: Mapping[str, Any]) -> list[str]:
    return [str(x) for x in [*(container.get("command") or []), *(container.get("args") or [])]]


def _selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    wanted = dict(selector.get("matchLabels") or {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def k8s_problems(resources: list[Resource], secret_template: Resource) -> list[str]:
    """Consistency of rendered manifests with the settings, the commands and themselves."""
    problems: list[str] = []
    known = settings_variables()
    secret_names = {k for k, v in known.items() if v["secret"]}

    # --- namespace -----------------------------------------------------------------------
    namespaces = [r["metadata"]["name"] for r in resources if r.get("kind") == "Namespace"]
    if len(namespaces) != 1:
        problems.append(f"k8s: expected one Namespace, found {namespaces}")
    for r in [*resources, secret_template]:
        if r.get("kind") != "Namespace" and (r.get("metadata") or {}).get("namespace") not in namespaces:
            problems.append(f"k8s: {'/'.join(resource_id(r)[1:])} is not in namespace {namespaces}")

    # --- config and secret ---------------------------------------------------------------
    config = find(resources, "ConfigMap", CONFIGMAP_NAME)
    config_data: dict[str, str] = dict((config or {}).get("data") or {})
    if config is None:
        problems.append(f"k8s: no ConfigMap {CONFIGMAP_NAME}")
    for key in sorted(config_data):
        if key not in known:
            problems.append(f"k8s: ConfigMap key {key} is not a variable of worker/core/settings.py")
        elif key in secret_names:
            problems.append(f"k8s: secret {key} is in the ConfigMap; it belongs in Secret {SECRET_NAME}")
    secret_meta = secret_template.get("metadata") or {}
    secret_data = {**(secret_template.get("data") or {}), **(secret_template.get("stringData") or {})}
    if secret_template.get("kind") != "Secret" or secret_meta.get("name") != SECRET_NAME:
        problems.append(f"k8s: the secret template is not Secret {SECRET_NAME}")
    for key in sorted(set(secret_data) - secret_names):
        problems.append(f"k8s: Secret key {key} is not a secret variable of worker/core/settings.py")
    for key in sorted(SECRET_VARIABLES - set(secret_data)):
        problems.append(f"k8s: the Secret template lacks {key}")
    for key, value in secret_data.items():
        if value not in ("", None):
            problems.append(f"k8s: the Secret template holds a value for {key}; commit only blanks")
    dummy_secrets = {
        "ICHVOL_DATABASE_URL": "postgresql+psycopg2://u:p@db:5432/ichvol",
        "ICHVOL_BROKER_URL": "redis://redis:6379/0",
    }
    problems += settings_problems({**config_data, **dummy_secrets}, where=f"ConfigMap {CONFIGMAP_NAME}")

    # --- every container of ours -----------------------------------------------------------
    workloads = [r for r in resources if pod_spec(r) is not None]
    for workload in workloads:
        spec = pod_spec(workload) or {}
        where = f"k8s: {workload['kind']}/{workload['metadata']['name']}"
        security = spec.get("securityContext") or {}
        if security.get("runAsNonRoot") is not True or not int(security.get("runAsUser", 0)):
            problems.append(f"{where}: pods must run as a non-root numeric user (runAsNonRoot, runAsUser)")
        if pod_labels(workload) and not _selector_matches(
            (workload.get("spec") or {}).get("selector") or {"matchLabels": pod_labels(workload)},
            pod_labels(workload),
        ):
            problems.append(f"{where}: selector does not match the pod template's labels")
        for container in all_containers(spec):
            cwhere = f"{where} container {container.get('name')}"
            available: set[str] = set()
            sources = container.get("envFrom") or []
            refs = {("configMap", s["configMapRef"]["name"]) for s in sources if "configMapRef" in s}
            refs |= {("secret", s["secretRef"]["name"]) for s in sources if "secretRef" in s}
            if refs != {("configMap", CONFIGMAP_NAME), ("secret", SECRET_NAME)}:
                problems.append(f"{cwhere}: envFrom must be ConfigMap {CONFIGMAP_NAME} and Secret {SECRET_NAME}")
            available |= set(config_data) | set(secret_data)
            for item in container.get("env") or []:
                name = item.get("name")
                available.add(name)
                if name not in known:
                    problems.append(f"{cwhere}: env {name} is not a variable of worker/core/settings.py")
                elif name in secret_names and "value" in item:
                    problems.append(f"{cwhere}: secret {name} has a literal value; use Secret {SECRET_NAME}")
                key_ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if key_ref and (key_ref.get("name") != SECRET_NAME or key_ref.get("key") not in secret_data):
                    problems.append(f"{cwhere}: env {name} refers to a missing secret key {key_ref}")
            for word in container_argv(container):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                    if ref not in available:
                        problems.append(f"{cwhere}: $({ref}) in its command is not in its environment")
            resources_spec = container.get("resources") or {}
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in (resources_spec.get(part) or {}):
                        problems.append(f"{cwhere}: no {part}.{res}")

    # --- worker ----------------------------------------------------------------------------
    worker = find(resources, "Deployment", WORKER_DEPLOYMENT)
    if worker is None:
        problems.append(f"k8s: no Deployment {WORKER_DEPLOYMENT}")
    else:
        problems += _worker_problems(worker, config_data)

    scheduler = find(resources, "Deployment", SCHEDULER_DEPLOYMENT)
    if scheduler is None:
        problems.append(f"k8s: no Deployment {SCHEDULER_DEPLOYMENT}")
    else:
        container = (pod_spec(scheduler) or {}).get("containers", [{}])[0]
        if tuple(container_argv(container)) != SCHEDULER_ARGV:
            problems.append(f"k8s: the scheduler does not run `{' '.join(SCHEDULER_ARGV)}`")
        if (scheduler.get("spec") or {}).get("replicas") != 1:
            problems.append("k8s: the scheduler must have exactly one replica")
        probe = ((container.get("readinessProbe") or {}).get("exec") or {}).get("command") or []
        if tuple(probe[:2]) != CHECK_ARGV:
            problems.append("k8s: the scheduler's readiness probe is not `ichvol check`")

    jobs = [r for r in resources if r.get("kind") == "Job"]
    if not any(tuple(container_argv(c)) == MIGRATE_ARGV for j in jobs for c in all_containers(pod_spec(j) or {})):
        problems.append(f"k8s: no Job runs `{' '.join(MIGRATE_ARGV)}`")

    problems += _flower_problems(resources)
    problems += _disruption_problems(resources)
    problems += _scaledobject_problems(resources, config_data)
    return problems


def _worker_problems(worker: Resource, config_data: Mapping[str, str]) -> list[str]:
    problems: list[str] = []
    spec = pod_spec(worker) or {}
    containers = spec.get("containers") or []
    if len(containers) != 1:
        return ["k8s: the worker pod must have exactly one container (one Celery process per GPU)"]
    container = containers[0]
    problems += worker_argv_problems(container_argv(container), queue="$(ICHVOL_QUEUE)", where="k8s worker")
    if "ICHVOL_QUEUE" not in config_data:
        problems.append("k8s: ICHVOL_QUEUE (used in the worker command) is not in the ConfigMap")
    for probe_name in ("livenessProbe", "startupProbe"):
        command = ((container.get(probe_name) or {}).get("exec") or {}).get("command") or []
        text = command[-1].replace('"', "") if command[:2] == ["sh", "-c"] else " ".join(command)
        if text.removeprefix("exec ") != WORKER_PING:
            problems.append(f"k8s: the worker's {probe_name} is not `{WORKER_PING}` (in sh -c)")
    hard_s = float(config_data.get("ICHVOL_HARD_TIME_LIMIT_S", settings_default("ICHVOL_HARD_TIME_LIMIT_S")))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not grace > hard_s:
        problems.append(
            f"k8s: worker terminationGracePeriodSeconds {grace} is not above the hard time limit {hard_s} s"
        )
    limits = (container.get("resources") or {}).get("limits") or {}
    requests = (container.get("resources") or {}).get("requests") or {}
    if str(limits.get(GPU_RESOURCE)) != "1" or str(requests.get(GPU_RESOURCE, 1)) != "1":
        problems.append(f"k8s: the worker must ask for exactly one {GPU_RESOURCE} (limits, and requests if set)")
    if not spec.get("nodeSelector") and not spec.get("affinity"):
        problems.append("k8s: the worker has no node selector or affinity for GPU nodes")
    if not any(t.get("key") == GPU_RESOURCE for t in spec.get("tolerations") or []):
        problems.append(f"k8s: the worker does not tolerate the {GPU_RESOURCE} taint")
    return problems


def _flower_problems(resources: list[Resource]) -> list[str]:
    problems: list[str] = []
    flower = next(
        (r for r in resources for c in all_containers(pod_spec(r) or {}) if tuple(container_argv(c)) == FLOWER_ARGV),
        None,
    )
    if flower is None:
        return [f"k8s: nothing runs `{' '.join(FLOWER_ARGV)}`"]
    container = next(c for c in all_containers(pod_spec(flower) or {}) if tuple(container_argv(c)) == FLOWER_ARGV)
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    if FLOWER_PORT not in ports.values():
        problems.append(f"k8s: flower does not declare containerPort {FLOWER_PORT}")
    services = [r for r in resources if r.get("kind") == "Service"]
    matching = [
        s for s in services if _selector_matches({"matchLabels": s["spec"].get("selector")}, pod_labels(flower))
    ]
    if not matching:
        problems.append("k8s: no Service selects the flower pods")
    for service in matching:
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if ports.get(target, target) != FLOWER_PORT:
                problems.append(f"k8s: Service {service['metadata']['name']} targets {target}, not {FLOWER_PORT}")
    return problems


def _disruption_problems(resources: list[Resource]) -> list[str]:
    worker = find(resources, "Deployment", WORKER_DEPLOYMENT)
    budgets = [r for r in resources if r.get("kind") == "PodDisruptionBudget"]
    if worker is None or not any(
        _selector_matches(b["spec"].get("selector") or {}, pod_labels(worker)) for b in budgets
    ):
        return ["k8s: no PodDisruptionBudget selects the worker pods"]
    return []


def _scaledobject_problems(resources: list[Resource], config_data: Mapping[str, str]) -> list[str]:
    problems: list[str] = []
    queue = config_data.get("ICHVOL_QUEUE", settings_default("ICHVOL_QUEUE"))
    for scaled in (r for r in resources if r.get("kind") == "ScaledObject"):
        spec = scaled.get("spec") or {}
        target = spec.get("scaleTargetRef") or {}
        kind = target.get("kind", "Deployment")
        aimed = find(resources, kind, str(target.get("name")))
        if aimed is None:
            problems.append(f"k8s: ScaledObject targets missing {kind}/{target.get('name')}")
        elif "replicas" in (aimed.get("spec") or {}):
            problems.append(f"k8s: {kind}/{target.get('name')} sets replicas, which would fight the autoscaler")
        for trigger in spec.get("triggers") or []:
            if trigger.get("type") == "redis" and (trigger.get("metadata") or {}).get("listName") != queue:
                problems.append(
                    f"k8s: ScaledObject watches list {trigger['metadata'].get('listName')!r}, "
                    f"but the queue (ICHVOL_QUEUE) is {queue!r}"
                )
        if int(spec.get("maxReplicaCount", 100)) < int(spec.get("minReplicaCount", 0)):
            problems.append("k8s: ScaledObject maxReplicaCount is below minReplicaCount")
    return problems


def worker_argv_problems(argv: list[str], *, queue: str, where: str) -> list[str]:
    """The worker command is the contract's, with the queue the settings name."""
    expected = [part.format(queue=queue) for part in WORKER_ARGV]
    if argv != expected:
        return [f"{where}: worker command {' '.join(argv)!r} is not {' '.join(expected)!r}"]
    return []


# --------------------------------------------------------------------------- all at once


def all_problems() -> list[str]:
    """Everything, as scripts/validate-deploy.sh reports it."""
    problems: list[str] = []
    compose = load_yaml(COMPOSE_FILE)
    problems += compose_schema_problems(compose)
    problems += compose_problems(compose)
    secret = load_secret_template()
    for version in K8S_VERSIONS:
        problems += k8s_schema_problems(secret, version=version)
    for overlay in overlay_names():
        resources = render_overlay(overlay)
        for version in K8S_VERSIONS:
            for resource in resources:
                problems += [f"{overlay}: {p}" for p in k8s_schema_problems(resource, version=version)]
        problems += [f"{overlay}: {p}" for p in k8s_problems(resources, secret)]
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["render"] and len(args) == 2:
        print(yaml.safe_dump_all(render_overlay(args[1]), sort_keys=False), end="")
        return 0
    if args:
        print("usage: python -m tests.deploy.checks [render OVERLAY]", file=sys.stderr)
        return 2
    problems = all_problems()
    for problem in problems:
        print(problem)
    print(f"deploy: {len(problems)} problem(s) in docker-compose.yml and {len(overlay_names())} overlay(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
