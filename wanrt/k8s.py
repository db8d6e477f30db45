"""Kubeflow PyTorchJob manifests (kubeflow.org/v1) that run `wanrt preview|refine` under torchrun.

Arrangement: one pod per node, each with `gpus` GPUs, running

    torchrun --nnodes N --nproc-per-node G --node-rank $(PET_NODE_RANK)
             --master-addr $(PET_MASTER_ADDR) --master-port $(PET_MASTER_PORT) -m wanrt <command> ...

Pod 0 is the job's single Master replica, pods 1..N-1 its Workers. The training operator
(v1.9, pkg/controller.v1/pytorch/envvar.go) sets on every pod PET_NODE_RANK (its index,
Master 0), PET_MASTER_ADDR (`<name>-master-0`) and PET_MASTER_PORT (the Master container's
`pytorchjob-port`), and Kubernetes expands `$(VAR)` in a command from the container's env.
torchrun then starts G processes per pod with RANK / LOCAL_RANK / WORLD_SIZE; `wanrt preview`
deals its candidates over them, each on its own GPU.

Volumes: the checkpoint claim read-only at /ckpt (the default `--ckpt-dir`), the output claim
at /outputs (the working directory, so relative `--out`/`--output`/`--from` paths land there,
and the wanrt cache, so prompt embeddings and checkpoint hashes persist across jobs), and a
memory-backed /dev/shm (the container default, 64 MiB, is too small for torch workers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from wanrt.errors import InputError, WanrtError

CKPT_MOUNT = "/ckpt"
OUTPUT_MOUNT = "/outputs"
# What the webhook requires (pkg/webhooks/pytorch): a container with this name, and the
# controller reads the master port from its port of this name.
CONTAINER_NAME = "pytorch"
PORT_NAME = "pytorchjob-port"
MASTER_PORT = 23456  # the operator's default PyTorchJob port
# Job names are DNS-1035 labels (the webhook's check); short enough that the pod names
# `<name>-worker-<i>` stay within the 63-character limit.
_JOB_NAME = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


class K8sUnavailableError(WanrtError):
    """The kubeflow-training SDK (the `k8s` extra) is not installed."""


class JobCommand(str, Enum):
    PREVIEW = "preview"
    REFINE = "refine"


@dataclass(frozen=True)
class JobOptions:
    """Where and on what the job runs; `gpus` is per node (pod)."""

    image: str
    ckpt_pvc: str
    output_pvc: str
    name: str | None = None  # default: wanrt-<command>
    namespace: str = "default"
    nodes: int = 1
    gpus: int = 1
    memory: str = "64Gi"  # per pod, request = limit
    cpu: str = "8"
    shm: str = "16Gi"

    def check(self, command: JobCommand) -> None:
        """InputError naming the flag, for what the API server or the webhook would refuse."""
        if not self.image:
            raise InputError("--image is required: the container image with wanrt installed")
        name = self.name or f"wanrt-{command.value}"
        if not _JOB_NAME.fullmatch(name):
            raise InputError(f"--name {name!r} must be lower-case letters, digits and '-', start with a "
                             "letter and be at most 50 characters")
        for flag, value in (("--namespace", self.namespace), ("--ckpt-pvc", self.ckpt_pvc),
                            ("--output-pvc", self.output_pvc)):
            if not value or not _DNS_SUBDOMAIN.fullmatch(value):
                raise InputError(f"{flag} {value!r} must be a Kubernetes name (lower-case letters, digits, '-', '.')")
        for flag, value in (("--memory", self.memory), ("--cpu", self.cpu), ("--shm", self.shm)):
            if not _QUANTITY.fullmatch(value):
                raise InputError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 64Gi, 8, 500m)")
        if self.nodes < 1 or self.gpus < 1:
            raise InputError(f"--nodes {self.nodes} and --gpus {self.gpus} must be at least 1")
        if command is JobCommand.REFINE and self.nodes * self.gpus > 1:
            raise InputError("wanrt refine renders one video on one GPU: use --gpus 1 --nodes 1 "
                             "(spread previews over GPUs with `wanrt k8s preview`)")


def container_command(command: JobCommand, args: Sequence[str], options: JobOptions) -> list[str]:
    """torchrun over the pod's GPUs running `wanrt <command> <args>`, `--ckpt-dir` defaulting
    to the checkpoint mount."""
    wanrt_args = list(args)
    if not any(arg.split("=")[0] in ("--ckpt-dir", "--ckpt_dir") for arg in wanrt_args):
        wanrt_args = ["--ckpt-dir", CKPT_MOUNT, *wanrt_args]
    return ["torchrun", "--nnodes", str(options.nodes), "--nproc-per-node", str(options.gpus),
            "--node-rank", "$(PET_NODE_RANK)", "--master-addr", "$(PET_MASTER_ADDR)",
            "--master-port", "$(PET_MASTER_PORT)", "-m", "wanrt", command.value, *wanrt_args]


def _sdk():
    try:
        from kubeflow.training import constants, models
    except ImportError:
        raise K8sUnavailableError("the kubeflow-training SDK is not installed: pip install 'wanrt[k8s]'") from None
    return constants, models


def pytorch_job(command: JobCommand, args: Sequence[str], options: JobOptions):
    """The `KubeflowOrgV1PyTorchJob` running `wanrt <command> <args>` as described above."""
    options.check(command)
    constants, models = _sdk()
    name = options.name or f"wanrt-{command.value}"
    labels = {"app.kubernetes.io/name": "wanrt", "app.kubernetes.io/component": command.value}
    resources = models.V1ResourceRequirements(
        limits={"nvidia.com/gpu": str(options.gpus), "memory": options.memory},
        requests={"cpu": options.cpu, "memory": options.memory})
    container = models.V1Container(
        name=CONTAINER_NAME, image=options.image, command=container_command(command, args, options),
        working_dir=OUTPUT_MOUNT, resources=resources,
        env=[models.V1EnvVar(name="WANRT_CACHE_DIR", value=f"{OUTPUT_MOUNT}/.wanrt-cache")],
        ports=[models.V1ContainerPort(name=PORT_NAME, container_port=MASTER_PORT)],
        volume_mounts=[models.V1VolumeMount(name="checkpoints", mount_path=CKPT_MOUNT, read_only=True),
                       models.V1VolumeMount(name="outputs", mount_path=OUTPUT_MOUNT),
                       models.V1VolumeMount(name="dshm", mount_path="/dev/shm")])
    volumes = [
        models.V1Volume(name="checkpoints", persistent_volume_claim=models.V1PersistentVolumeClaimVolumeSource(
            claim_name=options.ckpt_pvc, read_only=True)),
        models.V1Volume(name="outputs", persistent_volume_claim=models.V1PersistentVolumeClaimVolumeSource(
            claim_name=options.output_pvc)),
        models.V1Volume(name="dshm", empty_dir=models.V1EmptyDirVolumeSource(medium="Memory",
                                                                             size_limit=options.shm)),
    ]

    def replicas(count: int):
        # Never restarted: a failed generation (out of memory, a bad input) fails the same
        # way again, and each retry would hold the GPUs for nothing.
        return models.KubeflowOrgV1ReplicaSpec(
            replicas=count, restart_policy="Never",
            template=models.V1PodTemplateSpec(metadata=models.V1ObjectMeta(labels=labels),
                                              spec=models.V1PodSpec(containers=[container], volumes=volumes)))
    specs = {constants.REPLICA_TYPE_MASTER: replicas(1)}
    if options.nodes > 1:
        specs[constants.REPLICA_TYPE_WORKER] = replicas(options.nodes - 1)
    return models.KubeflowOrgV1PyTorchJob(
        api_version=constants.API_VERSION, kind=constants.PYTORCHJOB_KIND,
        metadata=models.V1ObjectMeta(name=name, namespace=options.namespace, labels=labels),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(options.gpus), pytorch_replica_specs=specs,
            # Pods are kept after the run for `kubectl logs`; no retry of a failed job.
            run_policy=models.KubeflowOrgV1RunPolicy(clean_pod_policy="None", backoff_limit=0)))


def job_manifest(job) -> dict[str, Any]:
    """The job as the API server takes it (camelCase keys, no unset fields)."""
    from kubeflow.training.api_client import ApiClient

    return ApiClient().sanitize_for_serialization(job)


def manifest_yaml(job) -> str:
    import yaml

    return yaml.safe_dump(job_manifest(job), sort_keys=False)
