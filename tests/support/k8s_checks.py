"""The project's checks of cluster/k8s, each a function of the parsed manifests (and the training config) that
returns its problems, one line each naming the key, the value and the fix; empty: none found. The tests
(test_k8s_manifests.py, test_k8s_resources.py) run them on the shipped manifests and on broken copies, and the
same functions run on any other version of a manifest (e.g. `git show HEAD:cluster/k8s/...`).

What KubeRay does with a manifest is modelled from KubeRay v1.7.0's source, read, not copied:
- ray-operator/controllers/ray/common/pod.go: `ray start` params from the group-level `resources` field
  (updateRayStartParamsResources), num-cpus / memory from the container limits and num-gpus from a `*gpu` limit
  (generateRayStartCommand, addWellKnownAcceleratorResources; the latter first parses rayStartParams.resources as
  JSON after trimming quotes and spaces, getResourcesMap, and gives up on the whole node, num-gpus included, when
  that fails), and the /dev/shm emptyDir it adds, sized to the container's memory limit (else request), unless the
  container already mounts /dev/shm or rayStartParams sets plasma-directory (BuildPod, makeEmptyDirVolume);
- ray-operator/controllers/ray/utils/validation.go: rayStartParams num-cpus / num-gpus / memory / resources and
  the group-level `resources` exclude each other (validateRayGroupResources); backoffLimit is refused with
  InteractiveMode and with a clusterSelector (ValidateRayJobSpec);
- ray-operator/controllers/ray/rayjob_controller.go: K8sJobMode's submitter Job has backoffLimit 2 by default
  (createNewK8sJob) and its failure fails the RayJob; RayJob.spec.backoffLimit retries a Failed RayJob on a new
  RayCluster (checkBackoffLimitAndUpdateStatusIfNeeded); HTTPMode has no submitter.
Ray's side is Ray's own code: the object store size is ray._private.utils.resolve_object_store_memory (30% of the
available memory, capped at 95% of /dev/shm when that is over 10 GB), the autoscaler's reading of a group is
ray.autoscaler._private.kuberay.autoscaling_config (tests/support/kuberay.py ray_node_types).
"""

from __future__ import annotations

import json
import re
import shlex
from unittest import mock

from tests.support.kuberay import PVC, RayClusterSpec, RayJob, pod_specs, ray_node_types, worker_groups

GIB = 2**30
IMAGE_GID = 100  # rayproject/ray's base-deps image: user `ray` uid 1000 in group users (gid 100)
RAY_START_USED = 2 * GIB  # memory a pod already uses when `ray start` sizes the object store (margin)
_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "m": 1e-3,
}


def quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ("96Gi", "500m", "4") as a number."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"{q!r} is not a Kubernetes quantity")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


# ----------------------------------------------------------------------------------------------------------------
# 5. What `ray start` KubeRay builds for each group: head without GPUs, workers with their GPUs


def kuberay_start_params(group) -> tuple[dict[str, str], list[str]]:
    """(rayStartParams KubeRay passes to `ray start`, what it logs as failed) for a head or worker group."""
    params, errors = dict(group.rayStartParams), []
    for name, value in (group.resources or {}).items():
        key = {"cpu": "num-cpus", "memory": "memory"}.get(name.lower())
        if key or name.lower().endswith("gpu"):
            params[key or "num-gpus"] = str(int(quantity(value)))
    custom = {
        k: quantity(v) for k, v in (group.resources or {}).items() if k.lower() not in ("cpu", "memory")
    }
    custom = {k: v for k, v in custom.items() if not k.lower().endswith("gpu")}
    if custom:
        params["resources"] = "'" + json.dumps(custom) + "'"
    limits = group.template.spec.containers[0].resources.limits
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(int(quantity(limits["cpu"])))
    try:
        json.loads(params.get("resources", "{}").strip("'\"` "))
    except ValueError:
        errors.append(f"rayStartParams.resources={params['resources']} is not JSON to KubeRay")
        return params, errors  # KubeRay: "failed to add accelerator resources", num-gpus never set
    gpus = [v for k, v in sorted(limits.items()) if k.endswith("gpu") and quantity(v) > 0]
    if "num-gpus" not in params and gpus:
        params["num-gpus"] = str(int(quantity(gpus[0])))
    return params, errors


def check_ray_start(spec: RayClusterSpec) -> list[str]:
    """KubeRay accepts each group's resources, parses them, and gives the head num-cpus 0 and num-gpus 0 and each
    worker its container's GPU limit; the autoscaler reads the same GPUs and custom resources."""
    problems, node_types = [], ray_node_types("check", spec)
    groups = [("head", "headgroup", spec.headGroupSpec)] + [
        (g.groupName, g.groupName, g) for g in spec.workerGroupSpecs
    ]
    for name, node_type, group in groups:
        clash = {"num-cpus", "num-gpus", "memory", "resources"} & set(group.rayStartParams)
        if clash and group.resources:
            problems.append(
                f"{name}: rayStartParams {sorted(clash)} and group `resources` both set: KubeRay refuses it"
            )
        params, errors = kuberay_start_params(group)
        problems += [
            f"{name}: {e}: KubeRay logs 'failed to add accelerator resources' and sets no num-gpus; "
            "use the group-level `resources:` field (KubeRay >= 1.4)"
            for e in errors
        ]
        limits = group.template.spec.containers[0].resources.limits
        gpus = str(int(quantity(limits.get("nvidia.com/gpu", 0)))) if name != "head" else "0"
        if params.get("num-gpus") != gpus:
            what = (
                "the head runs no actors: without num-gpus 0 it advertises the GPUs of a GPU node it lands on"
            )
            problems.append(
                f"{name}: `ray start` gets num-gpus={params.get('num-gpus')}, want {gpus} "
                f'({what if name == "head" else "the container GPU limit"}); set resources: {{GPU: "{gpus}"}}'
            )
        if name == "head" and params.get("num-cpus") != "0":
            problems.append(
                f'head: `ray start` gets num-cpus={params.get("num-cpus")}; set resources: {{CPU: "0"}}'
            )
        seen = node_types[node_type]["resources"]
        if seen.get("GPU", 0) != int(gpus):
            problems.append(
                f"{name}: Ray's autoscaler reads GPU={seen.get('GPU', 0)}, `ray start` gets {gpus}"
            )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# 3. /dev/shm and Ray's object store against the memory plan


def shm_bytes(template) -> int | None:
    """Size of the pod's /dev/shm: the template's own emptyDir mounted there, else KubeRay's (memory limit)."""
    container = template.spec.containers[0]
    volumes = {v.name: v for v in template.spec.volumes}
    for mount in container.volumeMounts:
        if mount.mountPath == "/dev/shm":
            empty = volumes[mount.name].emptyDir or {}
            return int(quantity(empty["sizeLimit"])) if "sizeLimit" in empty else None
    memory = container.resources.limits.get("memory", container.resources.requests.get("memory"))
    return int(quantity(memory)) if memory is not None else None


def object_store_bytes(group, shm: int) -> int:
    """Ray's object store of a pod: rayStartParams object-store-memory, else Ray's own default
    (resolve_object_store_memory) for the container's memory limit and this /dev/shm."""
    import ray._private.utils as ray_utils

    if "object-store-memory" in group.rayStartParams:
        return int(group.rayStartParams["object-store-memory"])
    memory = int(quantity(group.template.spec.containers[0].resources.limits["memory"]))
    with mock.patch.object(ray_utils, "get_shared_memory_bytes", return_value=shm):
        return ray_utils.resolve_object_store_memory(memory - RAY_START_USED)


def group_pools(cfg, spec: RayClusterSpec) -> dict[str, list[str]]:
    """The actors (memory-plan pools) each group's pod runs: the driver on the head; disaggregated, one pool per
    group of that name; colocated, every pool on every worker group."""
    pools = {"head": ["driver"]}
    for name in worker_groups(spec):
        colocated = cfg.placement.mode != "disaggregated"
        pools[name] = ["rollout", "reward", "learner"] if colocated else [name]
    return pools


def check_object_store(spec: RayClusterSpec, cfg, plan) -> list[str]:
    """Every pod's object store holds what the plan says one node of its pools needs, inside /dev/shm."""
    from cluster.plan.memory import node_object_store

    problems, groups = [], {"head": spec.headGroupSpec, **worker_groups(spec)}
    for (name, template), pools in zip(pod_specs(spec), group_pools(cfg, spec).values(), strict=True):
        shm = shm_bytes(template)
        if shm is None:
            problems.append(f"{name}: /dev/shm has no size (no memory limit); set resources.limits.memory")
            continue
        store, need = object_store_bytes(groups[name], shm), node_object_store(plan.object_store, pools)
        if store < need:
            problems.append(
                f"{name}: Ray's object store is {store / GIB:.1f} GiB (/dev/shm {shm / GIB:.1f} GiB, memory limit "
                f"{groups[name].template.spec.containers[0].resources.limits.get('memory')}) but `segr1 plan` "
                f"needs {need / GIB:.2f} GiB for {'+'.join(pools)}; drop the pod's own /dev/shm volume (KubeRay's is "
                "the memory limit) or set rayStartParams object-store-memory"
            )
        elif store > shm:
            problems.append(
                f"{name}: object store {store / GIB:.1f} GiB > /dev/shm {shm / GIB:.1f} GiB: it spills to /tmp"
            )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Bounds: the pools' max_workers against the groups' maxReplicas


def check_bounds(spec: RayClusterSpec, cfg, config_name: str) -> list[str]:
    """Disaggregated: <pool>.max_workers == maxReplicas x the pool's units a pod advertises / units an actor asks."""
    from cluster.pools.topology import POOL_RESOURCES, actor_options

    if cfg.placement.mode != "disaggregated":
        return []
    problems, node_types, groups = [], ray_node_types("check", spec), worker_groups(spec)
    for pool in ("rollout", "reward"):
        section = getattr(cfg, pool)
        resource = POOL_RESOURCES[pool]
        per_actor = actor_options(cfg, pool, section.resources)["resources"][resource]
        per_pod = node_types[pool]["resources"].get(resource, 0) / per_actor
        most = int(groups[pool].maxReplicas * per_pod)
        if section.max_workers != most:
            problems.append(
                f"{config_name}: {pool}.max_workers={section.max_workers} but worker group {pool} holds at most "
                f"maxReplicas {groups[pool].maxReplicas} x {per_pod:g} actor(s) per pod = {most}; set "
                f"{pool}.max_workers: {most} or change maxReplicas"
            )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# 2. The RayJob survives a multi-hour run and resumes when retried


def check_rayjob(job: RayJob) -> list[str]:
    problems, spec = [], job.spec
    if spec.submissionMode != "HTTPMode":
        problems.append(
            f"submissionMode={spec.submissionMode}: K8sJobMode's submitter Job (backoffLimit 2) fails the RayJob "
            "after three `ray job logs --follow` disconnects while the job still runs; set submissionMode: HTTPMode"
        )
    if not spec.backoffLimit:
        problems.append(
            f"backoffLimit={spec.backoffLimit}: a failed Ray job is not retried on a new cluster; set backoffLimit: 2"
        )
    argv = shlex.split(spec.entrypoint)
    if "--resume-if-any" not in argv or "--resume" in argv:
        problems.append(
            f"entrypoint {spec.entrypoint!r}: a retry must continue from the last checkpoint and a first attempt "
            "start afresh; pass --resume-if-any (not --resume, refused without a checkpoint)"
        )
    if spec.preRunningDeadlineSeconds is None:
        problems.append(
            "preRunningDeadlineSeconds unset: a Pending PVC or pod keeps the RayJob waiting forever"
        )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# 6. The shared volume: a ReadWriteMany class spelled out, and pods that can write to it


def check_pvc(pvc: PVC) -> list[str]:
    problems = []
    if not pvc.spec.storageClassName:
        problems.append(
            f"{pvc.metadata.name}: storageClassName unset: the default class (usually block storage, no "
            "ReadWriteMany) leaves the claim and every pod Pending; name a ReadWriteMany class"
        )
    if pvc.spec.accessModes != ["ReadWriteMany"]:
        problems.append(
            f"{pvc.metadata.name}: accessModes={pvc.spec.accessModes}; every pod mounts it: ReadWriteMany"
        )
    return problems


def check_fs_group(spec: RayClusterSpec) -> list[str]:
    problems = []
    for name, template in pod_specs(spec):
        context = template.spec.securityContext
        if context is None or context.fsGroup != IMAGE_GID:
            problems.append(
                f"{name}: securityContext.fsGroup={getattr(context, 'fsGroup', None)}: the image's `ray` user (uid "
                f"1000, gid {IMAGE_GID}) may not write runs/ on a root-owned volume; set fsGroup: {IMAGE_GID}"
            )
    return problems
