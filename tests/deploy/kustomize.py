"""A small renderer for the subset of kustomize that deploy/k8s uses, for offline tests.

No kustomize binary can be installed here, so the tests render the overlays themselves.
The subset is deliberately narrow and every field outside it is an error, so a manifest
that starts to rely on another kustomize feature fails a test instead of being rendered
wrongly in silence:

* ``resources``: files (one or more YAML documents) or folders holding a
  ``kustomization.yaml``, rendered recursively, in order. Remote URLs are refused.
* ``patches``: entries ``{path: FILE}`` only (no ``target``, no inline ``patch``). The
  patch names its target by apiVersion, kind, metadata.name (and namespace). Built-in
  Kubernetes kinds are patched as a *strategic merge patch* (lists of containers, env,
  volumes, volume mounts and ports merge on their keys; other lists are replaced); custom
  resources (e.g. keda.sh) as a *JSON merge patch* (RFC 7386: lists replaced whole), which
  is what kustomize does for kinds it has no OpenAPI schema for. ``null`` deletes a key.
  ``$patch`` and other directives are refused.
* ``images``: ``name`` with ``newName``, ``newTag`` and/or ``digest``, applied to every
  ``containers``/``initContainers`` entry wherever it appears in a resource.

As in kustomize, two resources with the same apiVersion group, kind, namespace and name are
an error, and so is a patch whose target is not among the resources.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
SUPPORTED_IMAGE_FIELDS = frozenset({"name", "newName", "newTag", "digest"})

# Strategic-merge keys of the built-in types we patch: (field name) -> merge key. Lists of
# any other field are replaced, as the Kubernetes OpenAPI declares for them.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
# The same field name with another key in one built-in kind.
_MERGE_KEYS_BY_KIND = {("Service", "ports"): "port"}

Resource = dict[str, Any]


class KustomizeError(Exception):
    """The kustomization uses something outside the subset, or is wrong (missing target, ...)."""


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(api group, kind, namespace, name): what kustomize treats as one resource."""
    api_version = str(resource.get("apiVersion", ""))
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    metadata = resource.get("metadata") or {}
    return (
        group,
        str(resource.get("kind", "")),
        str(metadata.get("namespace", "")),
        str(metadata.get("name", "")),
    )


def is_builtin(resource: Resource) -> bool:
    """Whether the kind is a built-in Kubernetes type (strategic merge) or a custom resource."""
    group = resource_id(resource)[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document of a file, each of which must be a mapping."""
    with path.open(encoding="utf-8") as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
    return docs


def render(folder: Path) -> list[Resource]:
    """Render the kustomization in ``folder``: the resources after patches and images."""
    return _render(folder.resolve(), stack=())


def _render(folder: Path, *, stack: tuple[Path, ...]) -> list[Resource]:
    if folder in stack:
        raise KustomizeError(f"{folder}: kustomization includes itself")
    kfile = folder / KUSTOMIZATION_FILE
    if not kfile.is_file():
        raise KustomizeError(f"{folder}: no {KUSTOMIZATION_FILE}")
    with kfile.open(encoding="utf-8") as handle:
        kustomization = yaml.safe_load(handle) or {}
    if not isinstance(kustomization, dict):
        raise KustomizeError(f"{kfile}: not a mapping")
    unsupported = sorted(set(kustomization) - SUPPORTED_FIELDS)
    if unsupported:
        raise KustomizeError(f"{kfile}: fields outside the supported subset: {', '.join(unsupported)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")

    resources: list[Resource] = []
    for entry in kustomization.get("resources") or []:
        if not isinstance(entry, str) or "://" in entry or entry.startswith(("github.com", "git@")):
            raise KustomizeError(f"{kfile}: only local resources are supported, got {entry!r}")
        path = (folder / entry).resolve()
        if path.is_dir():
            loaded = _render(path, stack=(*stack, folder))
        elif path.is_file():
            loaded = load_documents(path)
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} does not exist")
        for resource in loaded:
            _add(resources, resource, where=str(kfile))

    for entry in kustomization.get("patches") or []:
        if not isinstance(entry, dict) or set(entry) != {"path"}:
            raise KustomizeError(f"{kfile}: only patches of the form {{path: FILE}} are supported, got {entry!r}")
        patch_path = folder / entry["path"]
        if not patch_path.is_file():
            raise KustomizeError(f"{kfile}: patch {entry['path']!r} does not exist")
        for patch in load_documents(patch_path):
            _apply_patch(resources, patch, where=str(patch_path))

    for image in kustomization.get("images") or []:
        if not isinstance(image, dict) or "name" not in image or set(image) - SUPPORTED_IMAGE_FIELDS:
            raise KustomizeError(f"{kfile}: unsupported images entry {image!r}")
        for resource in resources:
            _set_images(resource, image)
    return resources


def _add(resources: list[Resource], resource: Resource, *, where: str) -> None:
    rid = resource_id(resource)
    if any(resource_id(existing) == rid for existing in resources):
        raise KustomizeError(f"{where}: resource {rid} appears twice")
    resources.append(copy.deepcopy(resource))


def _apply_patch(resources: list[Resource], patch: Resource, *, where: str) -> None:
    rid = resource_id(patch)
    for index, resource in enumerate(resources):
        if resource_id(resource) == rid:
            if is_builtin(resource):
                resources[index] = strategic_merge(resource, patch, kind=str(resource.get("kind", "")))
            else:
                resources[index] = json_merge(resource, patch)
            return
    raise KustomizeError(f"{where}: patch target {rid} is not among the resources")


def json_merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge, ``None`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge(result.get(key), value)
    return result


def strategic_merge(target: Any, patch: Any, *, kind: str) -> Any:
    """Strategic merge patch for built-in kinds (the subset described in the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise KustomizeError(f"patch directive {key!r} is not supported")
        if value is None:
            result.pop(key, None)
            continue
        merge_key = _MERGE_KEYS_BY_KIND.get((kind, key), _MERGE_KEYS.get(key))
        if isinstance(value, list) and merge_key is not None and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, merge_key=merge_key, kind=kind)
        elif isinstance(value, dict):
            result[key] = strategic_merge(result.get(key), value, kind=kind)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(target: list[Any], patch: list[Any], *, merge_key: str, kind: str) -> list[Any]:
    result = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise KustomizeError(f"patch list item {item!r} lacks its merge key {merge_key!r}")
        for index, existing in enumerate(result):
            if isinstance(existing, dict) and existing.get(merge_key) == item[merge_key]:
                result[index] = strategic_merge(existing, item, kind=kind)
                break
        else:
            result.append(copy.deepcopy(item))
    return result


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/a/b:tag@sha256:...`` -> (``registry:5000/a/b``, ``tag``, ``sha256:...``)."""
    name, _, digest = image.partition("@")
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, (digest or None)


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _new_image(container["image"], image)
            else:
                _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def _new_image(current: str, image: dict[str, str]) -> str:
    name, tag, digest = split_image(current)
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
