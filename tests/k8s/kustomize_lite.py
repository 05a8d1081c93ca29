"""A small kustomize in pure Python: the subset that k8s/ uses, so every overlay renders (and
is validated) without a kubectl binary. Where kubectl is installed, tests assert that both
render the same objects.

Supported kustomization fields:
- resources: YAML files (multi-document) and directories holding a kustomization.yaml;
- patches: from `path` or inline `patch`; a list of JSON 6902 operations (add, remove,
  replace, test) applied to the objects matching `target`, or strategic-merge patches (one
  per YAML document) without lists, merged like RFC 7386 (which is what kustomize does for
  custom resources, whose schemas carry no merge keys), matched by `target` or by their own
  kind and name;
- images: name, newName, newTag, digest, applied to every `image` in any `containers` or
  `initContainers` list at any depth (kustomize's legacy image filter, which also covers
  custom resources such as RayCluster).

Anything else raises UnsupportedKustomization, so a new feature in k8s/ fails here loudly
rather than rendering wrong. Patches that match nothing are errors too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a field or patch form this renderer does not implement."""


class PatchError(ValueError):
    """A patch does not apply: a failed `test`, a missing path, or no matching object."""


def kustomization_file(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def load_yaml_objects(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def object_key(obj: Obj) -> tuple[str, str, str]:
    group = obj.get("apiVersion", "").split("/")[0] if "/" in obj.get("apiVersion", "") else ""
    return (group, obj.get("kind", ""), obj.get("metadata", {}).get("name", ""))


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize directory` would print (order aside)."""
    directory = Path(directory)
    kfile = kustomization_file(directory)
    if kfile is None:
        raise FileNotFoundError(f"no kustomization file in {directory}")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - _SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{kfile}: unsupported fields {sorted(unknown)}")

    objects: list[Obj] = []
    for ref in spec.get("resources", []):
        path = directory / ref
        objects += render(path) if path.is_dir() else load_yaml_objects(path)
    keys = [object_key(o) for o in objects]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise PatchError(f"{kfile}: resources defined twice: {sorted(dupes)}")

    for entry in spec.get("patches", []):
        _apply_patch_entry(directory, entry, objects)
    for image in spec.get("images", []):
        unknown = set(image) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise UnsupportedKustomization(f"{kfile}: images fields {sorted(unknown)}")
        for obj in objects:
            _set_images(obj, image)
    return objects


def _matches(obj: Obj, target: dict[str, str]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name"}
    if unknown:
        raise UnsupportedKustomization(f"patch target fields {sorted(unknown)}")
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": obj.get("metadata", {}).get("name"),
    }
    return all(checks[k] == v for k, v in target.items())


def _apply_patch_entry(directory: Path, entry: dict[str, Any], objects: list[Obj]) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise UnsupportedKustomization(f"patch fields {sorted(unknown)}")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    target = entry.get("target")
    if len(docs) == 1 and isinstance(docs[0], list):
        if target is None:
            raise UnsupportedKustomization("a JSON 6902 patch needs a target")
        hits = [o for o in objects if _matches(o, target)]
        if not hits:
            raise PatchError(f"patch {entry} matches no object")
        for obj in hits:
            apply_json6902(obj, docs[0])
        return
    for patch in docs:  # strategic-merge patches, one per document
        if not isinstance(patch, dict):
            raise UnsupportedKustomization(f"patch document is neither a list nor a mapping: {entry}")
        match = target or {"kind": patch.get("kind"), "name": patch.get("metadata", {}).get("name")}
        hits = [o for o in objects if _matches(o, match)]
        if not hits:
            raise PatchError(f"patch {entry} ({match}) matches no object")
        for obj in hits:
            merge_patch(obj, patch)


def _split_pointer(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise PatchError(f"JSON pointer must start with '/': {pointer!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _parent(doc: Any, parts: list[str], pointer: str) -> Any:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f"path {pointer} does not exist") from None
    return node


def apply_json6902(doc: Obj, ops: list[dict[str, Any]]) -> None:
    """Apply RFC 6902 operations (add, remove, replace, test) in place."""
    for op in ops:
        kind, pointer = op.get("op"), op.get("path", "")
        parts = _split_pointer(pointer)
        parent, last = _parent(doc, parts, pointer), parts[-1]
        if kind == "test":
            try:
                current = parent[int(last)] if isinstance(parent, list) else parent[last]
            except (KeyError, IndexError, ValueError, TypeError):
                raise PatchError(f"test: path {pointer} does not exist") from None
            if current != op["value"]:
                raise PatchError(f"test failed at {pointer}: {current!r} != {op['value']!r}")
        elif kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), value)
            elif isinstance(parent, dict):
                parent[last] = value
            else:
                raise PatchError(f"add: parent of {pointer} is not a container")
        elif kind in ("replace", "remove"):
            try:
                if isinstance(parent, list):
                    index = int(last)
                    parent[index]  # noqa: B018 - must exist
                elif last not in parent:
                    raise KeyError(last)
                else:
                    index = last
            except (KeyError, IndexError, ValueError, TypeError):
                raise PatchError(f"{kind}: path {pointer} does not exist") from None
            if kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                del parent[index]
        else:
            raise UnsupportedKustomization(f"JSON 6902 op {kind!r}")


def merge_patch(doc: Obj, patch: Obj) -> None:
    """RFC 7386 merge in place; lists are refused (kustomize merges them by key for built-in
    kinds, which this renderer does not model)."""
    for key, value in patch.items():
        if isinstance(value, list):
            raise UnsupportedKustomization(f"list under {key!r} in a strategic-merge patch; use JSON 6902")
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            merge_patch(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/name:tag@sha256:x' -> ('reg:5000/name', 'tag', 'sha256:x')."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _new_image(container["image"], image)
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
    tag = image.get("newTag", tag)
    out = f"{name}:{tag}" if tag else name
    return f"{out}@{digest}" if digest and "newTag" not in image else out
