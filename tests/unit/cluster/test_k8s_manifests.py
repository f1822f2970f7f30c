"""cluster/k8s and cluster/docker: the KubeRay manifests against the KubeRay v1 fields they use (our schema in
tests/support/kuberay.py), KubeRay's validation rules, the pods, the PodMonitor and the image recipe; the RayJob's
long-run settings, the shared volume and the pods' `ray start` (tests/support/k8s_checks.py), on the shipped manifests
and on copies broken the way each check is there to catch.
Ray's reading of the clusters and the fit of the training configs: test_k8s_resources.py.
"""

from __future__ import annotations

import re

import pytest
import ray
import yaml
from pydantic import ValidationError

from cluster.config import TrainConfig
from tests.support.k8s_checks import check_fs_group, check_pvc, check_ray_start, check_rayjob, shm_bytes
from tests.support.kuberay import (
    DOCKERFILE,
    EXAMPLES,
    IMAGE_WORKDIR,
    K8S,
    MANIFESTS,
    PVC,
    ROOT,
    SCHEMAS,
    SHIPPED_YAML,
    PodMonitor,
    RayCluster,
    RayJob,
    all_manifests,
    config_path,
    pod_specs,
    pvc,
    raycluster,
    rayjob,
    read_docs,
    train_config,
)

# ----------------------------------------------------------------------------------------------------------------
# Every shipped YAML parses; every manifest matches the schema


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_parses(path):
    docs = read_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_schema(path):
    for doc in read_docs(path):
        assert doc.get("kind") in SCHEMAS, f"{path.name}: unexpected kind {doc.get('kind')!r}"
        SCHEMAS[doc["kind"]].model_validate(doc)


def test_schema_rejects_what_kuberay_rejects():
    good = read_docs(K8S / f"raycluster-{EXAMPLES[0]}.yaml")[0]
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
        assert config_path(rayjob(example)) == ROOT / "cluster" / "configs" / f"{example}.yaml"


# ----------------------------------------------------------------------------------------------------------------
# KubeRay's validation rules (controllers/ray/utils/validation.go) and Ray's version


@pytest.mark.parametrize("example", EXAMPLES)
def test_kuberay_validation_rules(example):
    cluster, job = raycluster(example), rayjob(example)
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
            for _, template in pod_specs(spec):
                assert template.spec.restartPolicy in (None, "Never"), (
                    "autoscaler v2 needs restartPolicy Never/unset"
                )
    assert job.spec.shutdownAfterJobFinishes is True
    assert job.spec.ttlSecondsAfterFinished is not None and job.spec.ttlSecondsAfterFinished >= 0


@pytest.mark.parametrize("example", EXAMPLES)
def test_rayjob_runs_the_same_cluster_as_the_raycluster(example):
    assert rayjob(example).spec.rayClusterSpec == raycluster(example).spec, (
        f"rayjob-{example}.yaml and raycluster-{example}.yaml drifted apart: keep their cluster specs identical"
    )


@pytest.mark.parametrize("example", EXAMPLES)
def test_rayjob_entrypoint_and_runtime_env(example):
    job = rayjob(example)
    assert check_rayjob(job) == []
    runtime_env = yaml.safe_load(job.spec.runtimeEnvYAML or "{}")
    assert set(runtime_env) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes", "config"}
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()), (
        "env_vars values are strings"
    )
    assert isinstance(train_config(example), TrainConfig)


# ----------------------------------------------------------------------------------------------------------------
# Pods: one image, GPUs, mounts, ports


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_pod_runs_one_project_image_with_the_data_mounted(example):
    spec, cfg = raycluster(example).spec, train_config(example)
    images = {c.image for _, t in pod_specs(spec) for c in t.spec.containers}
    assert len(images) == 1, f"head and workers must run the same image (same Ray, same code): {images}"
    assert not next(iter(images)).startswith("rayproject/"), (
        "the image must contain the project (cluster/docker)"
    )
    paths = [cfg.model.policy, cfg.data.train, cfg.checkpoint.dir, cfg.metrics.run_dir]
    paths += [p for p in (cfg.data.eval, cfg.reward.segmenter_path) if p]
    for group, template in pod_specs(spec):
        ray_container = template.spec.containers[0]
        volumes = {v.name for v in template.spec.volumes}
        mounts = {m.mountPath for m in ray_container.volumeMounts if m.name in volumes}
        # vLLM, NCCL and Ray's object store need a large /dev/shm: KubeRay's own is sized to the memory limit
        assert shm_bytes(template) is not None and shm_bytes(template) >= 2**30, f"{group}: no /dev/shm size"
        for p in paths:
            assert any(p.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{group}: {p} is on no mounted volume"
            )


@pytest.mark.parametrize("example", EXAMPLES)
def test_kuberay_starts_every_pod_with_its_resources_and_the_volume_is_writable(example):
    for spec in (raycluster(example).spec, rayjob(example).spec.rayClusterSpec):
        assert check_ray_start(spec) == []
        assert check_fs_group(spec) == []
    assert check_pvc(pvc()) == []


def _doc(name: str) -> dict:
    (doc,) = read_docs(K8S / name)
    return doc


def test_each_check_fails_on_what_it_is_there_to_catch():
    """The manifests as they were before issue 29: each fault found by its check, naming key, value and fix."""
    cluster = _doc("raycluster-qwen7b-8gpu.yaml")
    head = cluster["spec"]["headGroupSpec"]
    head.pop("resources")  # the escaped rayStartParams form KubeRay cannot parse, without num-gpus
    head["rayStartParams"].update({"num-cpus": "0", "resources": '"{\\"segr1_driver\\": 1}"'})
    problems = check_ray_start(RayCluster.model_validate(cluster).spec)
    assert any("head: rayStartParams.resources=" in p and "not JSON to KubeRay" in p for p in problems)
    assert any("head: `ray start` gets num-gpus=None, want 0" in p for p in problems)
    head["resources"] = {"GPU": "0"}  # both forms at once: KubeRay's validation refuses the cluster
    assert any(
        "both set: KubeRay refuses it" in p for p in check_ray_start(RayCluster.model_validate(cluster).spec)
    )
    for template in [head["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]:
        template["spec"].pop("securityContext")
    problems = check_fs_group(RayCluster.model_validate(cluster).spec)
    assert len(problems) == 4 and all(
        "securityContext.fsGroup=None" in p and "fsGroup: 100" in p for p in problems
    )

    job = _doc("rayjob-qwen7b-8gpu.yaml")
    job["spec"].update(
        submissionMode="K8sJobMode", entrypoint=job["spec"]["entrypoint"].replace("-if-any", "")
    )
    for key in ("backoffLimit", "preRunningDeadlineSeconds"):
        job["spec"].pop(key)
    problems = check_rayjob(RayJob.model_validate(job))
    assert [p.split(":")[0].split("=")[0].split(" ")[0] for p in problems] == [
        "submissionMode",
        "backoffLimit",
        "entrypoint",
        "preRunningDeadlineSeconds",
    ]
    volume = _doc("pvc.yaml")
    volume["spec"].pop("storageClassName")
    assert "storageClassName unset" in check_pvc(PVC.model_validate(volume))[0]


def test_resume_if_any_resumes_only_from_a_checkpoint(tmp_path, monkeypatch):
    """The RayJob's entrypoint (--resume-if-any): afresh on the first attempt, --resume on a retry."""
    import cluster.launch
    from cluster.cli import main

    seen = []
    monkeypatch.setattr(
        cluster.launch, "run_training", lambda cfg, resume: seen.append(resume) or {"groups_lost": 0}
    )
    from learner.checkpoint import save_checkpoint
    from tests.support.checkpoints import empty_optimizer, empty_policy

    argv = ["train", "--config", str(ROOT / "cluster/configs/demo.yaml"), f"checkpoint.dir={tmp_path}/ckpt"]
    assert main([*argv, "--resume-if-any"]) == 0
    (tmp_path / "ckpt" / "step-000009").mkdir(parents=True)  # a folder cut short is no checkpoint
    assert main([*argv, "--resume-if-any"]) == 0
    save_checkpoint(tmp_path / "ckpt", 7, {"policy_version": 7}, empty_policy, empty_optimizer)
    assert main([*argv, "--resume-if-any"]) == 0
    assert main(argv) == 0
    assert seen == [False, False, True, False]


# ----------------------------------------------------------------------------------------------------------------
# Prometheus scrapes every Ray pod


def test_podmonitor_scrapes_every_ray_pod_of_every_example():
    (monitor,) = [m for m in all_manifests().values() if isinstance(m, PodMonitor)]
    wanted = monitor.spec.selector["matchLabels"]
    kuberay_labels = {"ray.io/is-ray-node": "yes"}  # KubeRay adds it to every Ray pod
    ports = {e.port for e in monitor.spec.podMetricsEndpoints}
    assert "metrics" in ports
    for example in EXAMPLES:
        for group, template in pod_specs(raycluster(example).spec):
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
    assert re.search(r"pip install .*-e \"\.\[vllm,sam2,lora,tensorboard,wandb,mlflow\]\"", text), (
        "install the project with its vllm+sam2+lora extras and the experiment trackers (metrics.trackers)"
    )
    assert "--no-build-isolation" in text, "sam2 builds against the installed torch"
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", text, re.M)
    packages = re.search(r"^include = \[(.*)\]$", pyproject, re.M).group(1)  # [tool.setuptools.packages.find]
    for package in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY .* {package} \./{package}$", text, re.M), (
            f"Dockerfile does not copy {package}/"
        )
