"""deploy/k8s: every rendered manifest against the Kubernetes schemas, and consistency with the code."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import checks
from tests.deploy.kustomize import Resource, load_documents, render

FIXTURES = Path(__file__).parent / "fixtures"
OVERLAYS = checks.overlay_names()


@cache
def rendered(overlay: str) -> tuple[Resource, ...]:
    return tuple(checks.render_overlay(overlay))


def fresh(overlay: str) -> list[Resource]:
    return copy.deepcopy(list(rendered(overlay)))


def test_the_overlays_a_platform_team_expects_exist() -> None:
    assert {"fixed-workers", "gpu-cluster"} <= set(OVERLAYS)


def test_the_base_renders_every_component() -> None:
    kinds = sorted(f"{r['kind']}/{r['metadata']['name']}" for r in render(checks.K8S_DIR / "base"))
    assert kinds == [
        "ConfigMap/ichvol-config",
        "Deployment/ichvol-flower",
        "Deployment/ichvol-scheduler",
        "Deployment/ichvol-worker",
        "Job/ichvol-migrate",
        "Namespace/ichvol",
        "PodDisruptionBudget/ichvol-worker",
        "Service/ichvol-flower",
    ]


@pytest.mark.parametrize("version", checks.K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_matches_the_kubernetes_schemas(overlay: str, version: str) -> None:
    problems = [p for r in rendered(overlay) for p in checks.k8s_schema_problems(r, version=version)]
    assert problems == []


@pytest.mark.parametrize("version", checks.K8S_VERSIONS)
def test_secret_template_matches_the_kubernetes_schema(version: str) -> None:
    assert checks.k8s_schema_problems(checks.load_secret_template(), version=version) == []


def test_broken_manifest_is_rejected() -> None:
    (broken,) = load_documents(FIXTURES / "broken-worker-deployment.yaml")
    problems = checks.k8s_schema_problems(broken, version=checks.K8S_VERSIONS[0])
    assert len(problems) == 1
    assert "Deployment/ichvol/ichvol-worker" in problems[0]
    assert "'limit' was unexpected" in problems[0]


def test_broken_scaledobject_is_rejected() -> None:
    (broken,) = load_documents(FIXTURES / "broken-scaledobject.yaml")
    problems = checks.k8s_schema_problems(broken, version=checks.K8S_VERSIONS[0])
    assert any("listLength" in p and "is not of type 'string'" in p for p in problems), problems


def test_scaledobject_schema_rejects_unknown_fields_and_missing_list_name() -> None:
    scaled = copy.deepcopy(checks.find(rendered("gpu-cluster"), "ScaledObject", "ichvol-worker"))
    assert scaled is not None
    scaled["spec"]["maxReplicas"] = 3  # HPA's name, not KEDA's
    del scaled["spec"]["triggers"][0]["metadata"]["listName"]
    problems = checks.k8s_schema_problems(scaled, version=checks.K8S_VERSIONS[0])
    assert any("'maxReplicas' was unexpected" in p for p in problems), problems
    assert any("'listName' is a required property" in p for p in problems), problems


def test_an_unknown_custom_resource_is_not_waved_through() -> None:
    unknown = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "namespace": "ichvol"},
    }
    (problem,) = checks.k8s_schema_problems(unknown, version=checks.K8S_VERSIONS[0])
    assert "Couldn't find schema for kind Widget" in problem


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_are_consistent_with_settings_and_commands(overlay: str) -> None:
    assert checks.k8s_problems(fresh(overlay), checks.load_secret_template()) == []


def test_gpu_cluster_overlay_autoscales_and_uses_the_registry() -> None:
    resources = rendered("gpu-cluster")
    scaled = checks.find(resources, "ScaledObject", "ichvol-worker")
    assert scaled is not None
    assert scaled["spec"]["maxReplicaCount"] == 8
    assert scaled["spec"]["triggers"][0]["metadata"]["address"] == "redis.example.org:6379"
    images = {c["image"] for r in resources for c in checks.all_containers(checks.pod_spec(r) or {})}
    version = checks.package_version()
    assert images == {
        f"registry.example.org/ichvol/ichvol-worker:{version}",
        f"registry.example.org/ichvol/ichvol-scheduler:{version}",
    }


def test_fixed_workers_overlay_has_no_autoscaler_and_a_replica_count() -> None:
    resources = rendered("fixed-workers")
    assert not [r for r in resources if r["kind"] == "ScaledObject"]
    worker = checks.find(resources, "Deployment", "ichvol-worker")
    assert worker is not None and worker["spec"]["replicas"] == 2


def test_base_images_are_tagged_with_the_package_version() -> None:
    version = checks.package_version()
    for resource in render(checks.K8S_DIR / "base"):
        for container in checks.all_containers(checks.pod_spec(resource) or {}):
            assert container["image"] in {f"ichvol-worker:{version}", f"ichvol-scheduler:{version}"}


def test_worker_grace_period_exceeds_the_settings_default_hard_limit() -> None:
    worker = checks.find(rendered("gpu-cluster"), "Deployment", "ichvol-worker")
    assert worker is not None
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > checks.settings_default("ICHVOL_HARD_TIME_LIMIT_S")


# --- deliberate breakage: each mutation must be reported -------------------------------------


def worker_of(resources: list[Resource]) -> dict[str, Any]:
    worker = checks.find(resources, "Deployment", "ichvol-worker")
    assert worker is not None
    return worker


def worker_container(resources: list[Resource]) -> dict[str, Any]:
    container: dict[str, Any] = worker_of(resources)["spec"]["template"]["spec"]["containers"][0]
    return container


def config_data(resources: list[Resource]) -> dict[str, str]:
    config = checks.find(resources, "ConfigMap", "ichvol-config")
    assert config is not None
    data: dict[str, str] = config["data"]
    return data


def rename_config_variable(r: list[Resource]) -> None:
    config_data(r)["ICHVOL_QUEUE_NAME"] = config_data(r).pop("ICHVOL_QUEUE")


def secret_in_config(r: list[Resource]) -> None:
    config_data(r)["ICHVOL_BROKER_URL"] = "redis://redis:6379/0"


def malformed_config_value(r: list[Resource]) -> None:
    config_data(r)["ICHVOL_SOFT_TIME_LIMIT_S"] = "ten minutes"


def grace_below_hard_limit(r: list[Resource]) -> None:
    worker_of(r)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 700


def hard_limit_above_grace(r: list[Resource]) -> None:
    config_data(r)["ICHVOL_HARD_TIME_LIMIT_S"] = "900"


def no_gpu(r: list[Resource]) -> None:
    del worker_container(r)["resources"]["limits"]["nvidia.com/gpu"]


def two_gpus(r: list[Resource]) -> None:
    worker_container(r)["resources"]["limits"]["nvidia.com/gpu"] = 2
    worker_container(r)["resources"]["requests"]["nvidia.com/gpu"] = 2


def no_toleration(r: list[Resource]) -> None:
    del worker_of(r)["spec"]["template"]["spec"]["tolerations"]


def worker_queue_hardcoded(r: list[Resource]) -> None:
    worker_container(r)["args"][4] = "--queues=celery"


def unknown_reference_in_args(r: list[Resource]) -> None:
    worker_container(r)["args"][4] = "--queues=$(ICHVOL_QUEUES)"


def liveness_pings_another_worker(r: list[Resource]) -> None:
    worker_container(r)["livenessProbe"]["exec"]["command"][-1] = "celery -A worker inspect ping --timeout 10"


def env_not_in_settings(r: list[Resource]) -> None:
    worker_container(r)["env"].append({"name": "ICHVOL_WORKDIR", "value": "/scratch"})


def literal_secret(r: list[Resource]) -> None:
    worker_container(r)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})


def no_memory_limit(r: list[Resource]) -> None:
    del worker_container(r)["resources"]["limits"]["memory"]


def root_user(r: list[Resource]) -> None:
    del worker_of(r)["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def worker_replicas_fight_keda(r: list[Resource]) -> None:
    worker_of(r)["spec"]["replicas"] = 2


def keda_watches_other_list(r: list[Resource]) -> None:
    scaled = checks.find(r, "ScaledObject", "ichvol-worker")
    assert scaled is not None
    scaled["spec"]["triggers"][0]["metadata"]["listName"] = "celery"


def pdb_selects_nothing(r: list[Resource]) -> None:
    pdb = checks.find(r, "PodDisruptionBudget", "ichvol-worker")
    assert pdb is not None
    pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "wrker"


def flower_service_wrong_port(r: list[Resource]) -> None:
    service = checks.find(r, "Service", "ichvol-flower")
    assert service is not None
    service["spec"]["ports"][0]["targetPort"] = 8080


def scheduler_scaled_out(r: list[Resource]) -> None:
    scheduler = checks.find(r, "Deployment", "ichvol-scheduler")
    assert scheduler is not None
    scheduler["spec"]["replicas"] = 3


def no_migration(r: list[Resource]) -> None:
    r[:] = [x for x in r if x["kind"] != "Job"]


def other_namespace(r: list[Resource]) -> None:
    worker_of(r)["metadata"]["namespace"] = "default"


def no_secret_ref(r: list[Resource]) -> None:
    worker_container(r)["envFrom"] = [{"configMapRef": {"name": "ichvol-config"}}]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (rename_config_variable, "ICHVOL_QUEUE_NAME is not a variable"),
        (secret_in_config, "secret ICHVOL_BROKER_URL is in the ConfigMap"),
        (malformed_config_value, "ICHVOL_SOFT_TIME_LIMIT_S"),
        (grace_below_hard_limit, "terminationGracePeriodSeconds 700"),
        (hard_limit_above_grace, "hard time limit 900.0"),
        (no_gpu, "exactly one nvidia.com/gpu"),
        (two_gpus, "exactly one nvidia.com/gpu"),
        (no_toleration, "does not tolerate"),
        (worker_queue_hardcoded, "--queues=celery"),
        (unknown_reference_in_args, "$(ICHVOL_QUEUES) in its command is not in its environment"),
        (liveness_pings_another_worker, "livenessProbe"),
        (env_not_in_settings, "ICHVOL_WORKDIR is not a variable"),
        (literal_secret, "secret AWS_SECRET_ACCESS_KEY has a literal value"),
        (no_memory_limit, "no limits.memory"),
        (root_user, "non-root"),
        (worker_replicas_fight_keda, "fight the autoscaler"),
        (keda_watches_other_list, "watches list 'celery'"),
        (pdb_selects_nothing, "no PodDisruptionBudget selects the worker"),
        (flower_service_wrong_port, "targets 8080"),
        (scheduler_scaled_out, "exactly one replica"),
        (no_migration, "no Job runs `alembic upgrade head`"),
        (other_namespace, "not in namespace"),
        (no_secret_ref, "envFrom must be"),
    ],
)
def test_consistency_check_catches(mutate: Callable[[list[Resource]], None], expected: str) -> None:
    resources = fresh("gpu-cluster")
    mutate(resources)
    problems = checks.k8s_problems(resources, checks.load_secret_template())
    assert any(expected in p for p in problems), problems


def test_secret_template_with_a_value_is_reported() -> None:
    secret = checks.load_secret_template()
    secret["stringData"]["ICHVOL_DATABASE_URL"] = "postgresql://ichvol:realpassword@db/ichvol"
    problems = checks.k8s_problems(fresh("gpu-cluster"), secret)
    assert any("holds a value for ICHVOL_DATABASE_URL" in p for p in problems), problems


def test_secret_template_missing_a_secret_is_reported() -> None:
    secret = checks.load_secret_template()
    del secret["stringData"]["AWS_ACCESS_KEY_ID"]
    problems = checks.k8s_problems(fresh("gpu-cluster"), secret)
    assert any("lacks AWS_ACCESS_KEY_ID" in p for p in problems), problems


def test_a_setting_renamed_in_the_code_breaks_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = {k: v for k, v in checks.settings_variables().items() if k != "ICHVOL_RESULTS_BUCKET"}
    monkeypatch.setattr(checks, "settings_variables", lambda: renamed)
    problems = checks.k8s_problems(fresh("gpu-cluster"), checks.load_secret_template())
    assert any("ICHVOL_RESULTS_BUCKET is not a variable" in p for p in problems), problems
