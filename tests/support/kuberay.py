"""Our schema of the KubeRay v1 / Kubernetes fields that cluster/k8s uses, and loaders of the shipped manifests,
for the tests of cluster/k8s and cluster/docker (test_k8s_manifests.py, test_k8s_resources.py).

No Kubernetes cluster is needed: the schema is ours, written from KubeRay v1.7.0's Go types
(ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go) and its validation rules (controllers/ray/utils/validation.go).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from cluster.config import TrainConfig, load_config
from tests.support.paths import REPO

ROOT = REPO
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


class PodSecurityContext(_Strict):  # Kubernetes PodSecurityContext (the fields a Ray pod uses)
    fsGroup: StrictInt | None = Field(None, ge=0)
    fsGroupChangePolicy: Literal["OnRootMismatch", "Always"] | None = None
    runAsUser: StrictInt | None = Field(None, ge=0)
    runAsGroup: StrictInt | None = Field(None, ge=0)
    runAsNonRoot: StrictBool | None = None
    supplementalGroups: list[StrictInt] | None = None


class PodSpec(_Strict):
    securityContext: PodSecurityContext | None = None
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


class PVCSpec(_Strict):  # Kubernetes PersistentVolumeClaimSpec
    accessModes: list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]]
    storageClassName: StrictStr | None = None
    resources: Resources
    volumeMode: Literal["Filesystem", "Block"] | None = None
    volumeName: StrictStr | None = None
    selector: dict[str, Any] | None = None


class PVC(_Strict):
    apiVersion: Literal["v1"]
    kind: Literal["PersistentVolumeClaim"]
    metadata: Meta
    spec: PVCSpec


SCHEMAS: dict[str, type[BaseModel]] = {
    "RayCluster": RayCluster,
    "RayJob": RayJob,
    "PodMonitor": PodMonitor,
    "PersistentVolumeClaim": PVC,
}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def read_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_manifests() -> dict[str, BaseModel]:
    out = {}
    for path in MANIFESTS:
        for i, doc in enumerate(read_docs(path)):
            out[f"{path.name}#{i}"] = SCHEMAS[doc["kind"]].model_validate(doc)
    return out


def raycluster(example: str, text: str | None = None) -> RayCluster:
    """raycluster-<example>.yaml as shipped, or `text` (another version of it, e.g. `git show HEAD:...`)."""
    (doc,) = _docs(K8S / f"raycluster-{example}.yaml", text)
    return RayCluster.model_validate(doc)


def rayjob(example: str, text: str | None = None) -> RayJob:
    (doc,) = _docs(K8S / f"rayjob-{example}.yaml", text)
    return RayJob.model_validate(doc)


def pvc(text: str | None = None) -> PVC:
    (doc,) = _docs(K8S / "pvc.yaml", text)
    return PVC.model_validate(doc)


def _docs(path: Path, text: str | None) -> list[dict]:
    return read_docs(path) if text is None else [d for d in yaml.safe_load_all(text) if d is not None]


def config_path(job: RayJob) -> Path:
    """The repository file behind the RayJob's `--config` (paths in the image are under IMAGE_WORKDIR)."""
    argv = shlex.split(job.spec.entrypoint)
    assert argv[:3] == ["python", "-m", "cluster.train"], (
        f"entrypoint must run the training entry point: {argv}"
    )
    assert "--config" in argv, f"entrypoint passes no --config: {argv}"
    path = argv[argv.index("--config") + 1]
    assert path.startswith(IMAGE_WORKDIR + "/"), f"--config {path} is not inside the image's {IMAGE_WORKDIR}"
    return ROOT / path.removeprefix(IMAGE_WORKDIR + "/")


def train_config(example: str) -> TrainConfig:
    return load_config(config_path(rayjob(example)))


def worker_groups(spec: RayClusterSpec) -> dict[str, WorkerGroupSpec]:
    return {g.groupName: g for g in spec.workerGroupSpecs}


def pod_specs(spec: RayClusterSpec) -> list[tuple[str, PodTemplate]]:
    return [("head", spec.headGroupSpec.template)] + [
        (g.groupName, g.template) for g in spec.workerGroupSpecs
    ]


def ray_node_types(name: str, spec: RayClusterSpec) -> dict[str, dict]:
    """What Ray's autoscaler reads from this RayCluster (its own parser and its own config validation)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": spec.model_dump(exclude_none=True)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
