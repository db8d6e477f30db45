"""`wanrt k8s preview|refine`: PyTorchJob manifests, validated through the kubeflow-training
SDK's models (round trip), the training operator's admission rules, and torchrun's own
argument parser."""

from __future__ import annotations

import sys

import pytest
from test_cli import assert_one_line_error
from typer.testing import CliRunner
from wanrt.cli.app import app

from wanrt.k8s import CKPT_MOUNT, OUTPUT_MOUNT, JobCommand, JobOptions, job_manifest, manifest_yaml, pytorch_job

pytest.importorskip("kubeflow.training", reason="the kubeflow-training SDK (wanrt[k8s]) is not installed")
import yaml  # noqa: E402  (installed with the SDK)
from kubeflow.training.api_client import ApiClient  # noqa: E402
from kubeflow.training.utils.utils import FakeResponse  # noqa: E402

OPTIONS = JobOptions(image="registry.example/wanrt:0.1", ckpt_pvc="wan22-t2v", output_pvc="wan-outputs",
                     nodes=2, gpus=4)
PREVIEW_ARGS = ["--task", "t2v-A14B", "--prompt", "a red fox in the snow", "--count", "8", "--out", "fox"]
runner = CliRunner()


def wanrt(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def admission_errors(manifest: dict) -> list[str]:
    """The checks of the training operator's PyTorchJob webhook (v1.9,
    pkg/webhooks/pytorch/pytorchjob_webhook.go) that a manifest can fail."""
    import re

    errors = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"]) or \
            len(manifest["metadata"]["name"]) > 63:
        errors.append("metadata.name is not a DNS-1035 label")
    for replica_type, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
        if replica_type not in ("Master", "Worker"):
            errors.append(f"replica type {replica_type}")
        containers = spec["template"]["spec"]["containers"]
        if not any(c["name"] == "pytorch" for c in containers) or not all(c.get("image") for c in containers):
            errors.append(f"{replica_type}: no 'pytorch' container with an image")
        if replica_type == "Master" and spec["replicas"] != 1:
            errors.append("Master replicas must be 1")
        if replica_type == "Worker" and spec["replicas"] < 1:
            errors.append("Worker replicas must be at least 1")
    return errors


def test_preview_manifest_round_trips_through_the_sdk_and_passes_admission():
    job = pytorch_job(JobCommand.PREVIEW, PREVIEW_ARGS, OPTIONS)
    manifest = yaml.safe_load(manifest_yaml(job))
    assert manifest == job_manifest(job)
    again = ApiClient().deserialize(FakeResponse(manifest), "KubeflowOrgV1PyTorchJob")
    assert again == job
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert admission_errors(manifest) == []

    spec = manifest["spec"]
    assert spec["nprocPerNode"] == "4" and spec["runPolicy"] == {"backoffLimit": 0, "cleanPodPolicy": "None"}
    replicas = spec["pytorchReplicaSpecs"]
    assert {name: r["replicas"] for name, r in replicas.items()} == {"Master": 1, "Worker": 1}
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == OPTIONS.image and container["workingDir"] == OUTPUT_MOUNT
        assert container["command"] == [
            "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--node-rank", "$(PET_NODE_RANK)",
            "--master-addr", "$(PET_MASTER_ADDR)", "--master-port", "$(PET_MASTER_PORT)",
            "-m", "wanrt", "preview", "--ckpt-dir", CKPT_MOUNT, *PREVIEW_ARGS]
        assert container["resources"] == {"limits": {"nvidia.com/gpu": "4", "memory": "64Gi"},
                                          "requests": {"cpu": "8", "memory": "64Gi"}}
        assert container["ports"] == [{"containerPort": 23456, "name": "pytorchjob-port"}]
        mounts = {m["name"]: (m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]}
        assert mounts == {"checkpoints": (CKPT_MOUNT, True), "outputs": (OUTPUT_MOUNT, False),
                          "dshm": ("/dev/shm", False)}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "wan22-t2v", "readOnly": True}
        assert volumes["outputs"]["persistentVolumeClaim"] == {"claimName": "wan-outputs"}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


def test_the_container_command_is_what_torchrun_parses_into_2x4_processes():
    """The operator's PET_* values substituted, torchrun's parser yields 2 nodes x 4
    processes running `python -m wanrt preview ...` with static rendezvous at the Master."""
    from torch.distributed.run import config_from_args, get_args_parser

    manifest = job_manifest(pytorch_job(JobCommand.PREVIEW, PREVIEW_ARGS, OPTIONS))
    worker = manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    operator_env = {"$(PET_NODE_RANK)": "1", "$(PET_MASTER_ADDR)": "wanrt-preview-master-0",
                    "$(PET_MASTER_PORT)": "23456"}
    args = get_args_parser().parse_args([operator_env.get(arg, arg) for arg in worker[1:]])
    config, program, program_args = config_from_args(args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 4)
    assert (args.node_rank, args.master_addr, args.master_port, args.module) == (1, "wanrt-preview-master-0",
                                                                                  23456, True)
    assert program == sys.executable and program_args[:3] == ["-u", "-m", "wanrt"]
    assert program_args[3:] == ["preview", "--ckpt-dir", CKPT_MOUNT, *PREVIEW_ARGS]


def test_cli_prints_the_manifest_and_keeps_a_given_ckpt_dir():
    result = wanrt("k8s", "preview", "--image", OPTIONS.image, "--ckpt-pvc", "wan22-t2v", "--output-pvc",
                   "wan-outputs", "--gpus", 4, "--nodes", 2, "--", *PREVIEW_ARGS)
    assert result.exit_code == 0, result.output
    assert result.stdout == manifest_yaml(pytorch_job(JobCommand.PREVIEW, PREVIEW_ARGS, OPTIONS))

    refine = wanrt("k8s", "refine", "--image", OPTIONS.image, "--ckpt-pvc", "c", "--output-pvc", "o",
                   "--name", "fox-refine", "--", "--from", "fox", "--pick", 3, "--ckpt-dir", "/ckpt/other")
    assert refine.exit_code == 0, refine.output
    manifest = yaml.safe_load(refine.stdout)
    assert manifest["metadata"]["name"] == "fox-refine" and admission_errors(manifest) == []
    assert list(manifest["spec"]["pytorchReplicaSpecs"]) == ["Master"]  # one node: no Worker
    command = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    # The user's --ckpt-dir is kept, not preceded by the default.
    assert command[command.index("refine"):] == ["refine", "--from", "fox", "--pick", "3", "--ckpt-dir", "/ckpt/other"]


JOB = ["--image", "img", "--ckpt-pvc", "c", "--output-pvc", "o"]
K8S_ERRORS = {
    "refine-on-several-gpus": (["refine", *JOB, "--gpus", 2, "--", "--from", "p", "--pick", 0], "--gpus 1"),
    "wanrt-option-before-separator": (["preview", *JOB, "--prompt", "x"], "--prompt"),
    "misspelt-wanrt-option": (["preview", *JOB, "--", "--prompt", "x", "--cont", 3], "--cont"),
    "wanrt-option-bad-value": (["preview", *JOB, "--", "--count", "many"], "--count"),
    "missing-image": (["preview", "--ckpt-pvc", "c", "--output-pvc", "o", "--", "--prompt", "x"], "--image"),
    "bad-job-name": (["preview", *JOB, "--name", "Wan_Job", "--", "--prompt", "x"], "--name"),
    "bad-claim-name": (["preview", *JOB, "--ckpt-pvc", "My Claim", "--", "--prompt", "x"], "--ckpt-pvc"),
    "bad-memory": (["preview", *JOB, "--memory", "lots", "--", "--prompt", "x"], "--memory"),
    "zero-gpus": (["preview", *JOB, "--gpus", 0, "--", "--prompt", "x"], "--gpus"),
}


@pytest.mark.parametrize("case", K8S_ERRORS)
def test_k8s_errors_are_one_line_with_exit_2(case):
    arguments, needle = K8S_ERRORS[case]
    result = wanrt("k8s", *arguments)
    assert_one_line_error(result, needle)
    assert result.stdout == ""


def test_missing_sdk_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubeflow.training", None)  # import fails as if absent
    result = wanrt("k8s", "preview", *JOB, "--", "--prompt", "x")
    assert_one_line_error(result, "pip install 'wanrt[k8s]'")
