"""Offline validation of Kubernetes objects against the KubeRay CRD schemas in
tests/k8s/kuberay-crds (KubeRay v1.7.0, Apache-2.0; see the README.md there), or in
$TANDEM_KUBERAY_CRDS when set, and the Prometheus Operator's PodMonitor CRD in
tests/k8s/prometheus-operator-crds (v0.93.0, Apache-2.0).

What the API server checks when a custom resource is created, and how this module mirrors it:

- the served version's structural OpenAPI v3 schema (types, enums, required fields, patterns,
  int-or-string): jsonschema, draft 7 semantics;
- unknown fields: rejected under kubectl's default strict field validation. Here every object
  schema that lists `properties` (and has neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields`) gets `additionalProperties: false`;
- `format: int32` / `int64` bounds;
- `x-kubernetes-list-type: map | set`: no two items with the same key (defaults applied);
- CEL rules (`x-kubernetes-validations`) cannot run offline: a manifest that sets a field
  carrying one fails with a message saying so, so no rule is passed over silently.

Pods are not custom resources, but the CRDs embed the core/v1 PodSpec schema (in every
group's pod template), so a plain Pod's spec is validated against that same schema.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, ValidationError, validators

CRD_DIR = Path(os.environ.get("TANDEM_KUBERAY_CRDS", Path(__file__).resolve().parent / "kuberay-crds"))
MONITORING_CRD_DIR = Path(__file__).resolve().parent / "prometheus-operator-crds"

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which objects with listed properties reject unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


def _format(validator, fmt, instance, schema) -> Iterator[ValidationError]:
    if fmt not in ("int32", "int64") or not isinstance(instance, int) or isinstance(instance, bool):
        return
    bits = 32 if fmt == "int32" else 64
    if not -(2 ** (bits - 1)) <= instance < 2 ** (bits - 1):
        yield ValidationError(f"{instance} does not fit {fmt}")


def _list_type(validator, list_type, instance, schema) -> Iterator[ValidationError]:
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        defaults = {k: item_props.get(k, {}).get("default") for k in keys}
        seen: set[tuple[str, ...]] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, defaults[k]), sort_keys=True) for k in keys)
            if key in seen:
                yield ValidationError(f"duplicate entries for list-map key {dict(zip(keys, key))}")
            seen.add(key)
    elif list_type == "set":
        items = [json.dumps(item, sort_keys=True) for item in instance]
        if len(items) != len(set(items)):
            yield ValidationError("duplicate entries in a list-type set")


def _cel(validator, rules, instance, schema) -> Iterator[ValidationError]:
    listed = "; ".join(rule.get("rule", "?") for rule in rules)
    yield ValidationError(f"this field carries CEL rules that cannot be checked offline ({listed}); leave it unset")


KubeValidator = validators.extend(
    Draft7Validator,
    {"format": _format, "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel},
)


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, for every served version of every CRD."""
    if not CRD_DIR.is_dir():
        raise FileNotFoundError(f"KubeRay CRDs not found at {CRD_DIR} (set TANDEM_KUBERAY_CRDS)")
    if not MONITORING_CRD_DIR.is_dir():
        raise FileNotFoundError(f"PodMonitor CRD not found at {MONITORING_CRD_DIR}")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")) + sorted(MONITORING_CRD_DIR.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served"):
                    schema = _strict(version["schema"]["openAPIV3Schema"])
                    out[(f"{group}/{version['name']}", kind)] = schema
    if not out:
        raise FileNotFoundError(f"no CustomResourceDefinition in {CRD_DIR}")
    return out


@functools.lru_cache(maxsize=None)
def _validator(api_version: str, kind: str) -> KubeValidator:
    return KubeValidator(crd_schemas()[(api_version, kind)])


@functools.lru_cache(maxsize=None)
def _pod_spec_validator() -> KubeValidator:
    cluster = crd_schemas()[("ray.io/v1", "RayCluster")]
    pod_spec = cluster["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"]
    return KubeValidator(pod_spec)


def _where(err: ValidationError) -> str:
    return "/" + "/".join(str(p) for p in err.absolute_path)


def _metadata_errors(obj: dict[str, Any]) -> list[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ["/metadata: missing"]
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        return [f"/metadata/name: {name!r} is not a DNS-1123 subdomain"]
    return []


def is_custom_resource(obj: dict[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in crd_schemas() or _custom_group(obj)


def _custom_group(obj: dict[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).startswith(("ray.io/", "monitoring.coreos.com/"))


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Every reason the API server would reject `obj` that can be checked offline; [] = valid.

    Custom resources (ray.io, monitoring.coreos.com) against their CRD; Pods against the PodSpec schema the CRDs
    embed. Other built-in kinds get the metadata check only.
    """
    errors = _metadata_errors(obj)
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in crd_schemas():
        found = _validator(*key).iter_errors(obj)
        errors += [f"{_where(e)}: {e.message}" for e in sorted(found, key=_where)]
    elif _custom_group(obj):
        errors.append(f"no served CRD version for apiVersion {key[0]} kind {key[1]}")
    elif key == ("v1", "Pod"):
        found = _pod_spec_validator().iter_errors(obj.get("spec"))
        errors += [f"/spec{_where(e)}: {e.message}" for e in sorted(found, key=_where)]
    return errors
