"""`wanrt animate-prep`: the Animate-14B preprocessing (the official `preprocess_data.py`, with
its flag names) writing the `--src_root_path` folder of `wanrt generate --task animate-14B`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from wanrt.errors import InputError
from wanrt.generate import parse_device


def animate_prep_command(
    ckpt_path: Annotated[Path | None, typer.Option(
        "--ckpt_path", "--ckpt-path",
        help="The preprocessing models: Wan2.2-Animate-14B/process_checkpoint (det/yolov10m.onnx, "
             "pose2d/vitpose_h_wholebody.onnx, sam2/sam2_hiera_large.pt, FLUX.1-Kontext-dev/).")] = None,
    video_path: Annotated[Path | None, typer.Option(
        "--video_path", "--video-path", help="The driving (template) video.")] = None,
    refer_path: Annotated[Path | None, typer.Option(
        "--refer_path", "--refer-path", help="The reference (character) image.")] = None,
    save_path: Annotated[Path | None, typer.Option(
        "--save_path", "--save-path", help="The folder to write (the --src_root_path of the Animate run).")] = None,
    resolution_area: Annotated[tuple[int, int], typer.Option(
        "--resolution_area", "--resolution-area",
        help="W H: outputs keep the inputs' aspect ratio at this many pixels (sides multiples of 16).")] = (1280, 720),
    fps: Annotated[int, typer.Option("--fps", help="Frame rate of the outputs; -1 keeps the video's.")] = 30,
    replace_flag: Annotated[bool, typer.Option(
        "--replace_flag", "--replace-flag", help="Replacement: also write the background and mask videos (SAM2).")
    ] = False,
    retarget_flag: Annotated[bool, typer.Option(
        "--retarget_flag", "--retarget-flag", help="Animation: retarget the poses to the reference's body.")] = False,
    use_flux: Annotated[bool, typer.Option(
        "--use_flux", "--use-flux",
        help="Retarget through FLUX.1-Kontext edits to a standard pose (diffusers; needs --retarget_flag).")] = False,
    iterations: Annotated[int, typer.Option("--iterations", help="Dilations of the replacement mask.")] = 3,
    k: Annotated[int, typer.Option("--k", help="Kernel size of the mask dilation.")] = 7,
    w_len: Annotated[int, typer.Option("--w_len", "--w-len", help="Mask grid columns (1: the whole box).")] = 1,
    h_len: Annotated[int, typer.Option("--h_len", "--h-len", help="Mask grid rows (1: the whole box).")] = 1,
    device: Annotated[str | None, typer.Option(
        "--device", help="cpu, cuda or cuda:N (default: cuda when available).")] = None,
) -> None:
    """Preprocess a driving video and a character image for Animate-14B."""
    try:
        from wanrt.animate_prep.prepare import PrepOptions, checkpoint_files, load_models, prepare
    except ImportError as error:
        raise InputError(f"wanrt animate-prep needs {error.name}: pip install 'wanrt[animate-prep]'") from None

    for flag, value in (("--ckpt_path", ckpt_path), ("--video_path", video_path), ("--refer_path", refer_path),
                        ("--save_path", save_path)):
        if value is None:
            raise InputError(f"{flag} is required (see: wanrt animate-prep --help)")
    options = PrepOptions(resolution_area=resolution_area, fps=fps, replace=replace_flag, retarget=retarget_flag,
                          use_flux=use_flux, iterations=iterations, kernel_size=k, w_len=w_len,
                          h_len=h_len).checked()
    files = checkpoint_files(ckpt_path, options)
    chosen = parse_device(device)
    if chosen is None:
        import torch

        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = prepare(video_path, refer_path, save_path, lambda: load_models(files, str(chosen)), options)
    Console(soft_wrap=True, highlight=False).print(
        f"wrote {save_path}: {record['frames']} frames at {record['fps']:g} fps, poses "
        f"{record['pose_size']['width']}x{record['pose_size']['height']}", markup=False)
