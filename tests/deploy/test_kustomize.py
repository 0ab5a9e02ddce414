"""The kustomize-subset renderer the deployment tests rely on (tests/deploy/kustomize.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import (
    KustomizeError,
    json_merge,
    render,
    split_image,
    strategic_merge,
)

FIXTURES = Path(__file__).parent / "fixtures"


def write(folder: Path, name: str, *docs: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump_all(docs), encoding="utf-8")


def kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def deployment(name: str = "app", image: str = "app:1.0") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [{"name": "init", "image": image}],
                    "containers": [
                        {
                            "name": "main",
                            "image": image,
                            "args": ["a", "b"],
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                            "ports": [{"containerPort": 80, "name": "http"}],
                        },
                        {"name": "side", "image": "other:2"},
                    ],
                }
            }
        },
    }


def scaled_object() -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "app", "namespace": "ns"},
        "spec": {"maxReplicaCount": 2, "triggers": [{"type": "redis", "metadata": {"a": "1", "b": "2"}}]},
    }


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    write(folder, "app.yaml", deployment(), scaled_object())
    write(folder, "kustomization.yaml", kustomization(resources=["app.yaml"]))
    return folder


def test_overlay_renders_base_resources_in_order(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    write(
        overlay,
        "cm.yaml",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}},
    )
    write(overlay, "kustomization.yaml", kustomization(resources=["../base", "cm.yaml"]))
    assert [r["kind"] for r in render(overlay)] == ["Deployment", "ScaledObject", "ConfigMap"]


def test_strategic_merge_merges_containers_and_env_by_name(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "namespace": "ns"},
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "args": ["c"],
                            "env": [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}],
                        }
                    ]
                }
            },
        },
    }
    write(overlay, "patch.yaml", patch)
    write(overlay, "kustomization.yaml", kustomization(resources=["../base"], patches=[{"path": "patch.yaml"}]))
    rendered = render(overlay)[0]
    assert rendered["spec"]["replicas"] == 3
    main, side = rendered["spec"]["template"]["spec"]["containers"]
    assert main["image"] == "app:1.0"  # untouched fields survive
    assert main["args"] == ["c"]  # primitive lists are replaced
    assert main["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "20"},
        {"name": "C", "value": "3"},
    ]
    assert side == {"name": "side", "image": "other:2"}


def test_custom_resources_are_json_merge_patched(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    patch = scaled_object()
    patch["spec"] = {"maxReplicaCount": 9, "triggers": [{"type": "redis", "metadata": {"a": "10"}}]}
    write(overlay, "patch.yaml", patch)
    write(overlay, "kustomization.yaml", kustomization(resources=["../base"], patches=[{"path": "patch.yaml"}]))
    spec = render(overlay)[1]["spec"]
    assert spec["maxReplicaCount"] == 9
    assert spec["triggers"] == [{"type": "redis", "metadata": {"a": "10"}}]  # the list is replaced whole


def test_null_in_a_patch_deletes_the_key() -> None:
    assert strategic_merge({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None}}, kind="X") == {
        "a": 1,
        "b": {"d": 3},
    }
    assert json_merge({"a": 1, "b": 2}, {"a": None}) == {"b": 2}


def test_service_ports_merge_on_port_not_container_port() -> None:
    target = {"spec": {"ports": [{"port": 80, "targetPort": "http"}]}}
    patch = {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}
    assert strategic_merge(target, patch, kind="Service") == {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}


def test_images_rewrite_name_and_tag_in_containers_and_init_containers(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    images = [{"name": "app", "newName": "registry.example.org:5000/team/app", "newTag": "2.0"}]
    write(overlay, "kustomization.yaml", kustomization(resources=["../base"], images=images))
    spec = render(overlay)[0]["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["image"] == "registry.example.org:5000/team/app:2.0"
    assert spec["containers"][0]["image"] == "registry.example.org:5000/team/app:2.0"
    assert spec["containers"][1]["image"] == "other:2"


def test_images_digest_replaces_the_tag(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    images = [{"name": "app", "digest": "sha256:" + "a" * 64}]
    write(overlay, "kustomization.yaml", kustomization(resources=["../base"], images=images))
    assert render(overlay)[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "app@sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("app", ("app", None, None)),
        ("app:1.0", ("app", "1.0", None)),
        ("host:5000/a/b", ("host:5000/a/b", None, None)),
        ("host:5000/a/b:t@sha256:x", ("host:5000/a/b", "t", "sha256:x")),
    ],
)
def test_split_image(image: str, parts: tuple[str, str | None, str | None]) -> None:
    assert split_image(image) == parts


def test_missing_patch_target_is_an_error() -> None:
    with pytest.raises(KustomizeError, match="ichvol-wrker"):
        render(FIXTURES / "broken-overlay")


def test_duplicate_resources_are_an_error(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    write(overlay, "again.yaml", deployment())
    write(overlay, "kustomization.yaml", kustomization(resources=["../base", "again.yaml"]))
    with pytest.raises(KustomizeError, match="appears twice"):
        render(overlay)


@pytest.mark.parametrize(
    "fields",
    [
        {"namespace": "other"},
        {"configMapGenerator": [{"name": "x"}]},
        {"patches": [{"path": "p.yaml", "target": {"kind": "Deployment"}}]},
        {"images": [{"name": "app", "newTag": "1", "tagSuffix": "x"}]},
        {"resources": ["https://github.com/example/repo//base"]},
        {"resources": ["missing.yaml"]},
    ],
)
def test_fields_outside_the_subset_are_refused(base: Path, tmp_path: Path, fields: dict[str, Any]) -> None:
    overlay = tmp_path / "overlay"
    merged = {"resources": ["../base"], **fields}
    write(overlay, "kustomization.yaml", kustomization(**merged))
    with pytest.raises(KustomizeError):
        render(overlay)


def test_patch_directives_are_refused() -> None:
    with pytest.raises(KustomizeError, match=r"\$patch"):
        strategic_merge({"a": {"b": 1}}, {"a": {"$patch": "delete"}}, kind="Deployment")


def test_a_kustomization_that_includes_itself_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "loop", "kustomization.yaml", kustomization(resources=["."]))
    with pytest.raises(KustomizeError, match="includes itself"):
        render(tmp_path / "loop")
