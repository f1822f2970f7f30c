"""cluster/k8s and cluster/docker: the KubeRay manifests against the KubeRay v1 fields they use, against Ray's own
reading of a RayCluster (the autoscaler's), against the training configs they run, and against topology.

No Kubernetes cluster is needed: the schema below is ours, written from KubeRay v1.7.0's Go types
(ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go) and its validation rules (controllers/ray/utils/validation.go).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Literal

import pytest
import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from cluster.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "cluster" / "k8s"
DOCKERFILE = ROOT / "cluster" / "docker" / "Dockerfile"
IMAGE_WORKDIR = (
    "/home/ray/segr1"  # WORKDIR of cluster/docker/Dockerfile: the repository root inside the image
)
DRIVER_RESOURCE = "segr1_driver"  # advertised by every head so the driver loop can be pinned there
MANIFESTS = sorted(K8S.glob("*.yaml"))
SHIPPED_YAML = MANIFESTS + sorted((ROOT / "cluster" / "configs").glob("*.yaml"))
EXAMPLES = sorted(
    p.name.removeprefix("raycluster-").removesuffix(".yaml") for p in K8S.glob("raycluster-*.yaml")
)


# ----------------------------------------------------------------------------------------------------------------
# Our schema of the KubeRay v1 / Kubernetes fields the manifests rely on. extra="forbid": a misspelt or unknown
# field fails here instead of being dropped by the API server. Fields KubeRay has but we do not use are listed as
# Any so that adding one later is not mistaken for a typo.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Quantity = StrictStr | StrictInt | float


class Meta(_Strict):
    name: StrictStr | None = None
    namespace: StrictStr | None = None
    labels: dict[str, StrictStr] = {}
    annotations: dict[str, StrictStr] = {}


class Port(_Strict):
    containerPort: StrictInt = Field(ge=1, le=65535)
    name: StrictStr | None = Field(None, max_length=15)
    protocol: Literal["TCP", "UDP", "SCTP"] | None = None


class EnvVar(_Strict):
    name: StrictStr
    value: StrictStr | None = None
    valueFrom: dict[str, Any] | None = None


class Resources(_Strict):
    requests: dict[str, Quantity] = {}
    limits: dict[str, Quantity] = {}


class VolumeMount(_Strict):
    name: StrictStr
    mountPath: StrictStr
    readOnly: StrictBool | None = None
    subPath: StrictStr | None = None


class Container(_Strict):
    name: StrictStr
    image: StrictStr
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    ports: list[Port] = []
    resources: Resources
    env: list[EnvVar] = []
    volumeMounts: list[VolumeMount] = []
    command: list[StrictStr] | None = None
    args: list[StrictStr] | None = None
    lifecycle: dict[str, Any] | None = None


class Volume(_Strict):
    name: StrictStr
    persistentVolumeClaim: dict[str, Any] | None = None
    emptyDir: dict[str, Any] | None = None
    configMap: dict[str, Any] | None = None
    secret: dict[str, Any] | None = None
    csi: dict[str, Any] | None = None


class Toleration(_Strict):
    key: StrictStr
    operator: Literal["Exists", "Equal"]
    value: StrictStr | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PodSpec(_Strict):
    containers: list[Container] = Field(min_length=1)
    volumes: list[Volume] = []
    tolerations: list[Toleration] = []
    nodeSelector: dict[str, StrictStr] | None = None
    affinity: dict[str, Any] | None = None
    serviceAccountName: StrictStr | None = None
    restartPolicy: Literal["Always", "OnFailure", "Never"] | None = None


class PodTemplate(_Strict):
    metadata: Meta = Meta()
    spec: PodSpec


class HeadGroupSpec(_Strict):  # KubeRay v1 HeadGroupSpec
    rayStartParams: dict[str, StrictStr]  # map[string]string: an int here is rejected by the API server
    template: PodTemplate
    serviceType: StrictStr | None = None
    headService: Any = None
    enableIngress: Any = None
    ingressOptions: Any = None
    resources: dict[str, StrictStr] | None = None
    labels: dict[str, StrictStr] | None = None


class WorkerGroupSpec(_Strict):  # KubeRay v1 WorkerGroupSpec
    groupName: StrictStr
    replicas: StrictInt | None = Field(None, ge=0)
    minReplicas: StrictInt = Field(ge=0)
    maxReplicas: StrictInt = Field(ge=0)
    rayStartParams: dict[str, StrictStr]
    template: PodTemplate
    idleTimeoutSeconds: StrictInt | None = Field(None, ge=0)
    priority: StrictInt | None = None
    suspend: StrictBool | None = None
    resources: dict[str, StrictStr] | None = None
    labels: dict[str, StrictStr] | None = None
    scaleStrategy: Any = None
    numOfHosts: StrictInt | None = Field(None, ge=1)


class AutoscalerOptions(_Strict):  # KubeRay v1 AutoscalerOptions
    version: Literal["v1", "v2"] | None = None
    upscalingMode: Literal["Conservative", "Default", "Aggressive"] | None = None
    idleTimeoutSeconds: StrictInt | None = Field(None, ge=0)
    resources: Resources | None = None
    image: StrictStr | None = None
    imagePullPolicy: StrictStr | None = None
    securityContext: Any = None
    env: list[EnvVar] | None = None
    envFrom: Any = None
    volumeMounts: Any = None
    command: Any = None
    args: Any = None


class AuthOptions(_Strict):  # KubeRay v1 AuthOptions
    mode: Literal["disabled", "token"] | None = None
    secretName: StrictStr | None = None
    enableK8sTokenAuth: StrictBool | None = None


class RayClusterSpec(_Strict):  # KubeRay v1 RayClusterSpec
    rayVersion: StrictStr
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(min_length=1)
    enableInTreeAutoscaling: StrictBool | None = None
    autoscalerOptions: AutoscalerOptions | None = None
    authOptions: AuthOptions | None = None
    suspend: StrictBool | None = None
    headServiceAnnotations: Any = None
    gcsFaultToleranceOptions: Any = None
    upgradeStrategy: Any = None
    managedBy: Any = None
    historyServerOptions: Any = None
    networkPolicy: Any = None
    tlsOptions: Any = None


class RayCluster(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: Meta
    spec: RayClusterSpec


class RayJobSpec(_Strict):  # KubeRay v1 RayJobSpec
    entrypoint: StrictStr = Field(min_length=1)
    runtimeEnvYAML: StrictStr | None = None
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None
    shutdownAfterJobFinishes: StrictBool | None = None
    ttlSecondsAfterFinished: StrictInt | None = Field(None, ge=0)
    rayClusterSpec: RayClusterSpec
    activeDeadlineSeconds: StrictInt | None = Field(None, gt=0)
    preRunningDeadlineSeconds: StrictInt | None = Field(None, gt=0)
    backoffLimit: StrictInt | None = Field(None, ge=0)
    jobId: StrictStr | None = None
    entrypointNumCpus: float | None = None
    entrypointNumGpus: float | None = None
    entrypointResources: StrictStr | None = None
    submitterPodTemplate: Any = None
    submitterConfig: Any = None
    metadata: Any = None
    clusterSelector: Any = None
    managedBy: Any = None
    deletionStrategy: Any = None
    suspend: StrictBool | None = None


class RayJob(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Meta
    spec: RayJobSpec


class PodMetricsEndpoint(_Strict):
    port: StrictStr
    path: StrictStr = "/metrics"
    interval: StrictStr | None = None
    relabelings: list[dict[str, Any]] = []


class PodMonitorSpec(_Strict):
    jobLabel: StrictStr | None = None
    selector: dict[Literal["matchLabels"], dict[str, StrictStr]]
    namespaceSelector: dict[str, Any] | None = None
    podMetricsEndpoints: list[PodMetricsEndpoint] = Field(min_length=1)


class PodMonitor(_Strict):
    apiVersion: Literal["monitoring.coreos.com/v1"]
    kind: Literal["PodMonitor"]
    metadata: Meta
    spec: PodMonitorSpec


class PVC(_Strict):
    apiVersion: Literal["v1"]
    kind: Literal["PersistentVolumeClaim"]
    metadata: Meta
    spec: dict[str, Any]


SCHEMAS: dict[str, type[BaseModel]] = {
    "RayCluster": RayCluster,
    "RayJob": RayJob,
    "PodMonitor": PodMonitor,
    "PersistentVolumeClaim": PVC,
}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> dict[str, BaseModel]:
    out = {}
    for path in MANIFESTS:
        for i, doc in enumerate(_docs(path)):
            out[f"{path.name}#{i}"] = SCHEMAS[doc["kind"]].model_validate(doc)
    return out


def _cluster(example: str) -> RayCluster:
    (doc,) = _docs(K8S / f"raycluster-{example}.yaml")
    return RayCluster.model_validate(doc)


def _job(example: str) -> RayJob:
    (doc,) = _docs(K8S / f"rayjob-{example}.yaml")
    return RayJob.model_validate(doc)


def _config_path(job: RayJob) -> Path:
    """The repository file behind the RayJob's `--config` (paths in the image are under IMAGE_WORKDIR)."""
    argv = shlex.split(job.spec.entrypoint)
    assert argv[:3] == ["python", "-m", "cluster.train"], (
        f"entrypoint must run the training entry point: {argv}"
    )
    assert "--config" in argv, f"entrypoint passes no --config: {argv}"
    path = argv[argv.index("--config") + 1]
    assert path.startswith(IMAGE_WORKDIR + "/"), f"--config {path} is not inside the image's {IMAGE_WORKDIR}"
    return ROOT / path.removeprefix(IMAGE_WORKDIR + "/")


def _config(example: str) -> TrainConfig:
    return load_config(_config_path(_job(example)))


def _groups(spec: RayClusterSpec) -> dict[str, WorkerGroupSpec]:
    return {g.groupName: g for g in spec.workerGroupSpecs}


def _pod_specs(spec: RayClusterSpec) -> list[tuple[str, PodTemplate]]:
    return [("head", spec.headGroupSpec.template)] + [
        (g.groupName, g.template) for g in spec.workerGroupSpecs
    ]


def _node_types(name: str, spec: RayClusterSpec) -> dict[str, dict]:
    """What Ray's autoscaler reads from this RayCluster (its own parser and its own config validation)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": spec.model_dump(exclude_none=True)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


# ----------------------------------------------------------------------------------------------------------------
# Every shipped YAML parses; every manifest matches the schema


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_schema(path):
    for doc in _docs(path):
        assert doc.get("kind") in SCHEMAS, f"{path.name}: unexpected kind {doc.get('kind')!r}"
        SCHEMAS[doc["kind"]].model_validate(doc)


def test_schema_rejects_what_kuberay_rejects():
    good = _docs(K8S / f"raycluster-{EXAMPLES[0]}.yaml")[0]
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    int_param = yaml.safe_load(yaml.safe_dump(good))
    int_param["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 4
    for bad in (typo, int_param):
        with pytest.raises(ValidationError):
            RayCluster.model_validate(bad)


def test_every_example_ships_cluster_job_and_config():
    assert set(EXAMPLES) >= {"qwen7b-8gpu", "qwen3b-1gpu"}
    for example in EXAMPLES:
        assert (K8S / f"rayjob-{example}.yaml").is_file(), (
            f"raycluster-{example}.yaml has no rayjob-{example}.yaml"
        )
        assert _config_path(_job(example)) == ROOT / "cluster" / "configs" / f"{example}.yaml"


# ----------------------------------------------------------------------------------------------------------------
# KubeRay's validation rules (controllers/ray/utils/validation.go) and Ray's version


@pytest.mark.parametrize("example", EXAMPLES)
def test_kuberay_validation_rules(example):
    cluster, job = _cluster(example), _job(example)
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    assert dns1035.match(cluster.metadata.name) and len(cluster.metadata.name) <= 53
    assert dns1035.match(job.metadata.name) and len(job.metadata.name) <= 47  # + "-xxxxx" for its cluster
    for spec in (cluster.spec, job.spec.rayClusterSpec):
        assert spec.rayVersion == ray.__version__, (
            f"rayVersion {spec.rayVersion} != installed Ray {ray.__version__}"
        )
        # Ray 2.60 enables token auth by default: without authOptions the pods would not share one token.
        assert spec.authOptions is not None and spec.authOptions.mode == "token"
        autoscaling = bool(spec.enableInTreeAutoscaling)
        for group in spec.workerGroupSpecs:
            replicas = group.replicas if group.replicas is not None else group.minReplicas
            assert group.minReplicas <= replicas <= group.maxReplicas, (
                f"{group.groupName}: min <= replicas <= max"
            )
            if not autoscaling:
                assert group.minReplicas == group.maxReplicas == replicas, (
                    f"{group.groupName}: without the autoscaler nothing moves replicas between min and max"
                )
        if autoscaling and spec.autoscalerOptions and spec.autoscalerOptions.version == "v2":
            for _, template in _pod_specs(spec):
                assert template.spec.restartPolicy in (None, "Never"), (
                    "autoscaler v2 needs restartPolicy Never/unset"
                )
    assert job.spec.shutdownAfterJobFinishes is True
    assert job.spec.ttlSecondsAfterFinished is not None and job.spec.ttlSecondsAfterFinished >= 0


@pytest.mark.parametrize("example", EXAMPLES)
def test_rayjob_runs_the_same_cluster_as_the_raycluster(example):
    assert _job(example).spec.rayClusterSpec == _cluster(example).spec, (
        f"rayjob-{example}.yaml and raycluster-{example}.yaml drifted apart: keep their cluster specs identical"
    )


@pytest.mark.parametrize("example", EXAMPLES)
def test_rayjob_entrypoint_and_runtime_env(example):
    job = _job(example)
    assert job.spec.submissionMode in (None, "K8sJobMode")
    runtime_env = yaml.safe_load(job.spec.runtimeEnvYAML or "{}")
    assert set(runtime_env) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes", "config"}
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()), (
        "env_vars values are strings"
    )
    assert isinstance(_config(example), TrainConfig)


# ----------------------------------------------------------------------------------------------------------------
# Pods: one image, GPUs, mounts, ports


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_pod_runs_one_project_image_with_the_data_mounted(example):
    spec, cfg = _cluster(example).spec, _config(example)
    images = {c.image for _, t in _pod_specs(spec) for c in t.spec.containers}
    assert len(images) == 1, f"head and workers must run the same image (same Ray, same code): {images}"
    assert not next(iter(images)).startswith("rayproject/"), (
        "the image must contain the project (cluster/docker)"
    )
    paths = [cfg.model.policy, cfg.data.train, cfg.checkpoint.dir, cfg.metrics.run_dir]
    paths += [p for p in (cfg.data.eval, cfg.reward.segmenter_path) if p]
    for group, template in _pod_specs(spec):
        ray_container = template.spec.containers[0]
        volumes = {v.name for v in template.spec.volumes}
        mounts = {m.mountPath for m in ray_container.volumeMounts if m.name in volumes}
        assert "/dev/shm" in mounts, f"{group}: vLLM and NCCL need a large /dev/shm (emptyDir medium Memory)"
        for p in paths:
            assert any(p.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{group}: {p} is on no mounted volume"
            )


@pytest.mark.parametrize("example", EXAMPLES)
def test_ray_reads_the_resources_we_meant(example):
    spec = _cluster(example).spec
    node_types = _node_types(f"segr1-{example}", spec)
    head = node_types.pop("headgroup")
    assert head["resources"].get("CPU", 0) == 0 and "GPU" not in head["resources"], "the head runs no actors"
    assert head["resources"].get(DRIVER_RESOURCE) == 1
    for name, group in _groups(spec).items():
        limits = group.template.spec.containers[0].resources.limits
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus >= 1, f"{name}: every worker group of these examples is a GPU group"
        assert node_types[name]["resources"]["GPU"] == gpus, f"{name}: Ray sees a different GPU count"
        assert group.template.spec.tolerations, f"{name}: GPU nodes are usually tainted nvidia.com/gpu"


def test_each_pool_group_advertises_exactly_its_pool_resource():
    from cluster.topology import POOL_RESOURCES

    assert set(POOL_RESOURCES.values()) == {"segr1_rollout", "segr1_reward", "segr1_learner"}
    seen = set()
    for example in EXAMPLES:
        spec = _cluster(example).spec
        node_types = _node_types(f"segr1-{example}", spec)
        for name in _groups(spec):
            custom = {k for k in node_types[name]["resources"] if k.startswith("segr1_")}
            if name in POOL_RESOURCES:
                assert custom == {POOL_RESOURCES[name]}, f"{example}/{name} advertises {custom}"
                seen.add(name)
            else:
                assert not custom, f"{example}/{name} is no pool group but advertises {custom}"
    assert seen == set(POOL_RESOURCES), "the disaggregated example needs rollout, reward and learner groups"


# ----------------------------------------------------------------------------------------------------------------
# The training config fits the cluster it is shipped with


def _demand(options: dict) -> dict[str, float]:
    return {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}


def _pack(demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]] | None:
    """First-fit of actor demands onto node capacities; the unplaceable demands, or None when all fit."""
    free = [dict(n) for n in nodes]
    left = []
    for d in demands:
        for node in free:
            if all(node.get(k, 0) >= v - 1e-9 for k, v in d.items() if v > 0):
                for k, v in d.items():
                    node[k] = node.get(k, 0) - v
                break
        else:
            left.append(d)
    return left or None


def _nodes(spec: RayClusterSpec, node_types: dict[str, dict], at_most: bool) -> list[dict[str, float]]:
    """Ray resources of every node: the head plus `replicas` (at start) or `maxReplicas` pods per group."""
    out = [dict(node_types["headgroup"]["resources"])]
    for name, group in _groups(spec).items():
        n = (
            group.maxReplicas
            if at_most
            else (group.replicas if group.replicas is not None else group.minReplicas)
        )
        out += [dict(node_types[name]["resources"])] * n
    return out


@pytest.mark.parametrize("example", EXAMPLES)
def test_config_matches_its_cluster(example):
    from cluster.topology import POOL_RESOURCES

    cluster, cfg = _cluster(example), _config(example)
    groups = _groups(cluster.spec)
    if cfg.placement.mode == "disaggregated":
        assert set(POOL_RESOURCES) <= set(groups), "disaggregated needs one worker group per pool"
        assert cluster.spec.enableInTreeAutoscaling, (
            "the rollout group scales on its own through the autoscaler"
        )
        rollout = groups["rollout"]
        assert (cfg.rollout.max_workers or cfg.rollout.num_workers) <= rollout.maxReplicas
        assert cfg.rollout.num_workers <= (rollout.replicas or rollout.minReplicas)
        assert cfg.reward.num_workers <= (groups["reward"].replicas or groups["reward"].minReplicas)
        assert cfg.weight_sync.backend in ("auto", "nccl"), "pools on different pods sync weights over NCCL"
        # the learner actor reserves every GPU its FSDP ranks use
        assert cfg.learner.resources.num_gpus == cfg.learner.num_gpus
    else:
        assert not set(POOL_RESOURCES) & set(groups), "a colocated example has no per-pool groups"


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_actor_of_the_config_fits_on_the_cluster(example):
    from cluster.topology import actor_options

    cluster, cfg = _cluster(example), _config(example)
    node_types = _node_types(f"segr1-{example}", cluster.spec)

    def demands(rollout_workers: int) -> list[dict[str, float]]:
        learner = _demand(actor_options(cfg, "learner", cfg.learner.resources))
        reward = _demand(actor_options(cfg, "reward", cfg.reward.resources))
        rollout = _demand(actor_options(cfg, "rollout", cfg.rollout.resources))
        # biggest first, as a scheduler would have to manage
        return [learner] + [reward] * cfg.reward.num_workers + [rollout] * rollout_workers

    left = _pack(demands(cfg.rollout.num_workers), _nodes(cluster.spec, node_types, at_most=False))
    assert left is None, f"{example}: at start these actors find no node: {left}"
    most = cfg.rollout.max_workers or cfg.rollout.num_workers
    left = _pack(demands(most), _nodes(cluster.spec, node_types, at_most=True))
    assert left is None, f"{example}: at rollout.max_workers={most} these actors find no node: {left}"


# ----------------------------------------------------------------------------------------------------------------
# Prometheus scrapes every Ray pod


def test_podmonitor_scrapes_every_ray_pod_of_every_example():
    (monitor,) = [m for m in _manifests().values() if isinstance(m, PodMonitor)]
    wanted = monitor.spec.selector["matchLabels"]
    kuberay_labels = {"ray.io/is-ray-node": "yes"}  # KubeRay adds it to every Ray pod
    ports = {e.port for e in monitor.spec.podMetricsEndpoints}
    assert "metrics" in ports
    for example in EXAMPLES:
        for group, template in _pod_specs(_cluster(example).spec):
            labels = {**template.metadata.labels, **kuberay_labels}
            assert wanted.items() <= labels.items(), f"{example}/{group}: the PodMonitor does not select it"
            named = {p.name: p.containerPort for p in template.spec.containers[0].ports}
            assert named.get("metrics") == 8080, (
                f"{example}/{group}: Ray's metrics port is 8080 named 'metrics'"
            )
    targets = {r.get("targetLabel") for e in monitor.spec.podMetricsEndpoints for r in e.relabelings}
    assert {"ray_io_cluster", "ray_group"} <= targets, "the dashboard filters on ray_io_cluster and ray_group"


# ----------------------------------------------------------------------------------------------------------------
# The image recipe


def test_dockerfile_matches_ray_vllm_and_the_project():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base, "Dockerfile: ARG BASE_IMAGE=rayproject/ray:<version>-py<XY>-<gpu|cuXYZ> expected"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(3\d+)-(gpu|cu\d{3})", base.group(1))
    assert m and m.group(1) == ray.__version__, (
        f"base image {base.group(1)} must be Ray {ray.__version__}, GPU"
    )
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    vllm_pin = re.search(r'^vllm = \["vllm==([\d.]+)"\]', pyproject, re.M).group(1)
    assert f'"vllm=={vllm_pin}"' in text, f"Dockerfile must install vllm=={vllm_pin} (pyproject's vllm extra)"
    assert re.search(r"pip install .*-e \"\.\[vllm,sam2\]\"", text), (
        "install the project with its vllm+sam2 extras"
    )
    assert "--no-build-isolation" in text, "sam2 builds against the installed torch"
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", text, re.M)
    for package in ("protos", "actors", "reward_service", "learner", "cluster"):
        assert re.search(rf"^COPY .* {package} \./{package}$", text, re.M), (
            f"Dockerfile does not copy {package}/"
        )
