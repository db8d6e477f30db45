"""`wanrt k8s preview|refine [job options] -- [wanrt options]`: print a Kubeflow PyTorchJob
manifest (YAML, for `kubectl apply -f -`) that runs the command under torchrun (see wanrt.k8s).

The wanrt options after `--` are parsed by the real `wanrt preview`/`wanrt refine` parser
here, so a misspelt flag fails now, not in the cluster; paths are container paths.
"""

# No `from __future__ import annotations`: Typer reads the option annotations at run time,
# and those of the per-command closure below name its `command`.
from typing import Annotated, Callable

import typer

from wanrt.cli.preview import preview_command
from wanrt.cli.refine import refine_command
from wanrt.k8s import JobCommand, JobOptions, manifest_yaml, pytorch_job

k8s_app = typer.Typer(no_args_is_help=True, help="Print Kubeflow PyTorchJob manifests for preview/refine.")

_COMMANDS: dict[JobCommand, Callable[..., None]] = {JobCommand.PREVIEW: preview_command,
                                                    JobCommand.REFINE: refine_command}


def check_wanrt_args(command: JobCommand, args: list[str]) -> None:
    """Parse `args` as `wanrt <command>` would (types, choices, unknown flags), running nothing."""
    single = typer.Typer()
    single.command(name=command.value)(_COMMANDS[command])
    typer.main.get_command(single).make_context(f"wanrt {command.value}", list(args))


def _job_command(command: JobCommand) -> Callable[..., None]:
    def print_manifest(
        image: Annotated[str, typer.Option("--image", help="Container image with wanrt installed.")],
        ckpt_pvc: Annotated[str, typer.Option("--ckpt-pvc", help="PersistentVolumeClaim holding the checkpoint "
                                              "(mounted read-only at /ckpt, the default --ckpt-dir).")],
        output_pvc: Annotated[str, typer.Option("--output-pvc", help="PersistentVolumeClaim for outputs (mounted "
                                                "at /outputs, the working directory).")],
        wanrt_args: Annotated[list[str] | None, typer.Argument(
            help=f"Options of `wanrt {command.value}`, after `--`.", show_default=False)] = None,
        gpus: Annotated[int, typer.Option("--gpus", help="GPUs per node (torchrun processes per pod).")] = 1,
        nodes: Annotated[int, typer.Option("--nodes", help="Pods: one Master, the rest Workers.")] = 1,
        name: Annotated[str | None, typer.Option("--name", help=f"Job name (default: wanrt-{command.value}).")]
        = None,
        namespace: Annotated[str, typer.Option("--namespace", help="Kubernetes namespace.")] = "default",
        memory: Annotated[str, typer.Option("--memory", help="Host memory per pod.")] = JobOptions.memory,
        cpu: Annotated[str, typer.Option("--cpu", help="CPU cores requested per pod.")] = JobOptions.cpu,
        shm: Annotated[str, typer.Option("--shm", help="Size of the in-memory /dev/shm.")] = JobOptions.shm,
    ) -> None:
        args = wanrt_args or []
        options = JobOptions(image=image, ckpt_pvc=ckpt_pvc, output_pvc=output_pvc, name=name,
                             namespace=namespace, nodes=nodes, gpus=gpus, memory=memory, cpu=cpu, shm=shm)
        options.check(command)
        check_wanrt_args(command, args)
        typer.echo(manifest_yaml(pytorch_job(command, args, options)), nl=False)
    print_manifest.__doc__ = f"Print a PyTorchJob manifest running `wanrt {command.value}` under torchrun."
    return print_manifest


for _command in JobCommand:
    k8s_app.command(_command.value, no_args_is_help=True)(_job_command(_command))
