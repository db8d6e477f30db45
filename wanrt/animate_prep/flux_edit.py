"""Optional FLUX.1-Kontext pose editing before retargeting (the official ``--use_flux``).

The reference image and the template's second frame are each redrawn by FLUX.1-Kontext-dev
into a standard pose (T-pose or arms down, chosen from which limbs the template shows), so the
retargeting measures both bodies in the same pose. The model runs through diffusers'
``FluxKontextPipeline`` from ``<ckpt_path>/FLUX.1-Kontext-dev`` in diffusers layout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from wanrt.animate_prep.frames import letterbox
from wanrt.errors import InputError

# The official call's sampling settings.
NUM_INFERENCE_STEPS = 28
GUIDANCE_SCALE = 2.5
# Where the official preprocessor expects the pipeline, under --ckpt_path.
FLUX_FOLDER_NAME = "FLUX.1-Kontext-dev"

# Body points (OpenPose order) that show the arms (elbows, wrists) and the legs (knees, ankles).
ARM_POINTS = (3, 4, 6, 7)
LEG_POINTS = (9, 12, 10, 13)
# A point counts as seen from this confidence on.
VISIBLE_CONFIDENCE = 0.75

# The official prompts: a landscape image has room for a T-pose, a portrait one for arms down.
_T_POSE = "Change the person to a standard T-pose (facing forward with arms extended)."
_ARMS_DOWN = ("Change the person to a standard pose with the face oriented forward and arms "
              "extending straight down by the sides.")
_LEGS_SHOWN = " The person is standing. Feet and Hands are visible in the image."
_HANDS_SHOWN = " Hands are visible in the image."
_FACE_FORWARD = "Change the person to face forward."


def editing_prompts(template_metas: list[dict], reference_meta: dict) -> tuple[str, str]:
    """The official Kontext prompts (template, reference) from normalized pose dicts.

    Legs seen anywhere in the template ask for a standing full-body pose, arms only for a pose
    with visible hands, neither for facing forward; the pose is a T-pose in landscape images
    and arms down in portrait ones.
    """
    arms_seen = legs_seen = False
    last_meta = None
    for meta in template_metas:
        body = meta["keypoints_body"]
        arms_seen = arms_seen or _limb_seen(body, ARM_POINTS)
        legs_seen = legs_seen or _limb_seen(body, LEG_POINTS)
        last_meta = meta
        if arms_seen and legs_seen:
            break
    if not (arms_seen or legs_seen):
        return _FACE_FORWARD, _FACE_FORWARD
    suffix = _LEGS_SHOWN if legs_seen else _HANDS_SHOWN
    # The official code reads the template's size from its loop variable after the loop: the
    # frame the scan stopped at, not the first one. All frames of a template share one size,
    # so this only matters for hand-made inputs; it is kept for exact parity.
    return _pose_prompt(last_meta) + suffix, _pose_prompt(reference_meta) + suffix


def _limb_seen(body: np.ndarray, points: tuple[int, ...]) -> bool:
    """The official test, quirks included: some point of the limb has x, y and confidence all
    non-zero, and some (possibly other) point lies at x <= 1, y <= 1 (no lower bound, so
    off-image negative coordinates pass) with confidence >= VISIBLE_CONFIDENCE."""
    detected = any(body[index].all() for index in points)
    inside = any(body[index][0] <= 1 and body[index][1] <= 1 and body[index][2] >= VISIBLE_CONFIDENCE
                 for index in points)
    return bool(detected and inside)


def _pose_prompt(meta: dict) -> str:
    return _T_POSE if meta["width"] > meta["height"] else _ARMS_DOWN


class PoseEditor:
    """FLUX.1-Kontext-dev redrawing one person into the standard pose a prompt asks for."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @classmethod
    def load(cls, folder: Path, device: str, dtype: torch.dtype = torch.bfloat16,
             cpu_offload: bool = False) -> PoseEditor:
        """The pipeline in `folder` (diffusers layout) on `device`.

        `cpu_offload` keeps each model in host memory until it runs: the 12B transformer alone
        is ~22 GiB in bf16 and T5-XXL ~9 GiB, so a 24 GB card cannot hold both at once (the
        official code moves everything to the GPU).
        """
        if importlib.util.find_spec("diffusers") is None:
            raise InputError("--use_flux needs the `diffusers` package; install it with: "
                             "pip install 'wanrt[flux]'")
        folder = Path(folder)
        _check_folder(folder)
        if cpu_offload and importlib.util.find_spec("accelerate") is None:
            raise InputError("FLUX CPU offload needs the `accelerate` package; install it with: pip install 'wanrt[flux]'")
        from diffusers import FluxKontextPipeline

        try:
            # `torch_dtype`: the keyword every diffusers release since 0.35 accepts (newer ones
            # also take `dtype` and only warn about this one).
            pipeline = FluxKontextPipeline.from_pretrained(folder, torch_dtype=dtype)
        except OSError as error:
            first_line = str(error).strip().splitlines()[0]
            raise InputError(f"{_folder_flag(folder)} cannot be loaded ({first_line}); {_DOWNLOAD_FIX}") from None
        if cpu_offload:
            pipeline.enable_model_cpu_offload(device=device)
        else:
            pipeline.to(device)
        return cls(pipeline)

    def edit(self, image: np.ndarray, prompt: str, seed: int | None = None,
             num_inference_steps: int = NUM_INFERENCE_STEPS) -> np.ndarray:
        """`image` [H, W, 3] RGB uint8 redrawn as `prompt` asks, letterboxed back to H x W.

        Kontext works at about one megapixel whatever the input size, so its output is fitted
        back onto the input's size as the official code does. `seed` makes the edit
        reproducible (a CPU generator, so the same on any device); None draws fresh noise as
        the official code does.
        """
        from PIL import Image

        height, width = image.shape[:2]
        generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        edited = self.pipeline(image=Image.fromarray(image), height=height, width=width, prompt=prompt,
                               guidance_scale=GUIDANCE_SCALE, num_inference_steps=num_inference_steps,
                               generator=generator).images[0]
        return letterbox(np.asarray(edited), height, width)


_DOWNLOAD_FIX = ("download black-forest-labs/FLUX.1-Kontext-dev there in diffusers layout (a gated repo: "
                 "accept its licence, then `huggingface-cli download black-forest-labs/FLUX.1-Kontext-dev "
                 "--local-dir <ckpt_path>/FLUX.1-Kontext-dev`)")


def _folder_flag(folder: Path) -> str:
    return f"--ckpt_path {folder.parent}: {folder}"


def _check_folder(folder: Path) -> None:
    """Refuse a folder that is not a complete diffusers pipeline before loading anything:
    model_index.json and one sub-folder per component it names."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputError(f"{_folder_flag(folder)} has no model_index.json; {_DOWNLOAD_FIX}")
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{_folder_flag(folder)}: model_index.json is unreadable ({error}); {_DOWNLOAD_FIX}") from None
    # Entries other than [library, class] pairs are metadata; [null, null] marks an unused slot.
    missing = sorted(name for name, entry in components.items()
                     if isinstance(entry, list) and entry[0] is not None and not (folder / name).is_dir())
    if missing:
        raise InputError(f"{_folder_flag(folder)} lacks {', '.join(missing)}; {_DOWNLOAD_FIX}")
