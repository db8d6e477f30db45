"""The official `preprocess_data.py` run as one function: template video + reference image in,
the `src_root_path` folder of Animate-14B out.

Animation writes src_pose.mp4 (the template's poses drawn at the reference's size, optionally
retargeted to the reference's body), src_face.mp4 (512x512 face crops) and src_ref.png (the
reference file, copied); replacement also writes src_bg.mp4 (the template with the person
hidden) and src_mask.mp4 (what is hidden), at the template's size. Every file is written to a
temporary folder first and moved into place only when all of them are done, so a failure
leaves the destination as it was.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from wanrt.animate_prep.faces import face_crop
from wanrt.animate_prep.frames import letterbox, read_template, resize_to_area
from wanrt.animate_prep.masks import person_masks, replacement_mask
from wanrt.animate_prep.pose_meta import PoseMeta
from wanrt.animate_prep.render import draw_pose
from wanrt.animate_prep.retarget import retarget_poses
from wanrt.errors import InputError
from wanrt.limits import MAX_FRAMES, MAX_IMAGE_PIXELS, MAX_VIDEO_TOTAL_PIXELS
from wanrt.pipelines.animate import SOURCE_FILES
from wanrt.progress import phase
from wanrt.video_io import OutputWriteError, write_video_uint8

# The files of the official preprocessor's checkpoint folder (Wan2.2-Animate-14B/process_checkpoint).
POSE_MODEL = Path("pose2d/vitpose_h_wholebody.onnx")
DETECTOR = Path("det/yolov10m.onnx")
SAM2_CHECKPOINT = Path("sam2/sam2_hiera_large.pt")
FLUX_FOLDER = Path("FLUX.1-Kontext-dev")
# What `prepare` records about a run beside the official files.
RECORD_FILE = "animate_prep.json"


@dataclass(frozen=True)
class PrepOptions:
    """The official preprocessor's options (its flag names in comments)."""

    resolution_area: tuple[int, int] = (1280, 720)  # --resolution_area W H: the pixel area to fit
    fps: float = 30  # --fps; -1 keeps the template's rate
    replace: bool = False  # --replace_flag
    retarget: bool = False  # --retarget_flag
    use_flux: bool = False  # --use_flux
    iterations: int = 3  # --iterations of the mask dilation
    kernel_size: int = 7  # --k
    w_len: int = 1  # --w_len
    h_len: int = 1  # --h_len

    def checked(self) -> PrepOptions:
        width, height = self.resolution_area
        if width <= 0 or height <= 0 or width * height < 16 * 16:
            raise InputError(f"--resolution_area {width} {height} is too small; give a width and height whose "
                             "product is at least 256 (Wan2.2-Animate uses 1280 720)")
        if self.fps != -1 and self.fps <= 0:
            raise InputError(f"--fps {self.fps:g} must be positive, or -1 for the template video's own rate")
        if self.use_flux and not self.retarget:
            raise InputError("--use_flux edits the poses for retargeting; add --retarget_flag")
        if self.retarget and self.replace:
            raise InputError("--retarget_flag is for animation only (the official preprocessor ignores it with "
                             "--replace_flag); drop one of the two")
        for flag, value, least in (("--iterations", self.iterations, 0), ("--k", self.kernel_size, 1),
                                   ("--w_len", self.w_len, 1), ("--h_len", self.h_len, 1)):
            if value < least:
                raise InputError(f"{flag} {value} must be at least {least}")
        return self


@dataclass(frozen=True)
class PrepModels:
    """The models of one run, loaded by `load_models` (tests pass tiny ones)."""

    pose: Callable[[list[np.ndarray]], list[dict]]
    sam2: Any = None
    editor: Any = None


def checkpoint_files(ckpt_path: Path, options: PrepOptions) -> dict[str, Path]:
    """The model files a run needs, each checked to exist (one line naming the missing one)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_dir():
        raise InputError(f"--ckpt_path {ckpt_path} is not a folder; give Wan2.2-Animate-14B/process_checkpoint "
                         "(it holds det/, pose2d/ and sam2/)")
    needed = {"pose": POSE_MODEL, "detector": DETECTOR}
    if options.replace:
        needed["sam2"] = SAM2_CHECKPOINT
    if options.use_flux:
        needed["flux"] = FLUX_FOLDER
    files = {name: ckpt_path / relative for name, relative in needed.items()}
    for name, path in files.items():
        if not path.exists():
            raise InputError(f"--ckpt_path {ckpt_path} lacks {needed[name]}; download the preprocessing models "
                             "of Wan2.2-Animate-14B (its process_checkpoint folder)")
    return files


def load_models(files: dict[str, Path], device: str) -> PrepModels:
    from wanrt.animate_prep.masks import load_sam2
    from wanrt.animate_prep.pose2d import PoseEstimator

    require_module("onnxruntime", "the pose models", "animate-prep")
    if "sam2" in files:
        require_module("sam2", "--replace_flag (SAM2 masks)", "sam2")

    providers = None if device.startswith("cuda") else ["CPUExecutionProvider"]
    with phase("loading the pose models"):
        pose = PoseEstimator(files["pose"], files["detector"], providers=providers)
    sam2 = editor = None
    if "sam2" in files:
        with phase("loading SAM2"):
            sam2 = load_sam2(files["sam2"], device)
    if "flux" in files:
        from wanrt.animate_prep.flux_edit import PoseEditor

        with phase("loading FLUX.1-Kontext"):
            editor = PoseEditor.load(files["flux"], device, cpu_offload=device.startswith("cuda"))
    return PrepModels(pose, sam2, editor)


def require_module(module: str, what: str, extra: str) -> None:
    """One line naming the extra to install when an optional package is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise InputError(f"{what} need the {module} package: pip install 'wanrt[{extra}]'") from None


def prepare(video_path: Path, refer_path: Path, save_path: Path, load_models: Callable[[], PrepModels],
            options: PrepOptions = PrepOptions()) -> dict:
    """Write the `src_root_path` folder `save_path`; returns the record also written beside
    the official files. The inputs are read and checked before `load_models` is called."""
    options = options.checked()
    save_path = Path(save_path)
    if save_path.exists() and not save_path.is_dir():
        raise InputError(f"--save_path {save_path} is a file; give a folder (it is created if missing)")
    reference = read_reference(Path(refer_path))
    with phase("reading the template video"):
        frames, fps = read_template(Path(video_path), options.fps)
    area = options.resolution_area[0] * options.resolution_area[1]
    # Poses are drawn at the template's size for replacement, at the reference's for animation;
    # only the resized image is used after this (replacement reads the reference's file only).
    if options.replace:
        frames = [resize_to_area(frame, area) for frame in frames]
        pose_size = frames[0].shape[:2]
    else:
        reference = resize_to_area(reference, area)
        pose_size = reference.shape[:2]
    check_animate_limits(len(frames), *pose_size, fps)
    models = load_models()

    try:
        return _write_folder(video_path, refer_path, save_path, frames, fps, reference, pose_size, models, options)
    except OSError as error:
        raise OutputWriteError(f"could not write --save_path {save_path} ({error.strerror or error}); nothing "
                               "was changed there, check free disk space and write permission") from error


def _write_folder(video_path, refer_path, save_path: Path, frames, fps, reference, pose_size, models: PrepModels,
                  options: PrepOptions) -> dict:
    with tempfile.TemporaryDirectory(prefix=f".{save_path.name}.", dir=_parent(save_path)) as staging:
        staging = Path(staging)
        shutil.copyfile(refer_path, staging / SOURCE_FILES["ref"])  # the reference file itself, as official
        if options.replace:
            videos = _replacement(frames, models, options)
        else:
            videos = _animation(frames, reference, models, options, staging)
        for name, video in videos.items():
            with phase(f"writing {SOURCE_FILES[name]}"):
                write_video_uint8(np.stack(video), staging / SOURCE_FILES[name], fps)
        record = {"video_path": str(Path(video_path).absolute()), "refer_path": str(Path(refer_path).absolute()),
                  "frames": len(frames), "fps": fps, "pose_size": {"height": pose_size[0], "width": pose_size[1]},
                  "options": {**asdict(options), "resolution_area": list(options.resolution_area)}}
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into(staging, save_path, stale=() if options.replace else (SOURCE_FILES["bg"], SOURCE_FILES["mask"]))
    return record


def read_reference(path: Path) -> np.ndarray:
    """The reference image as RGB uint8, read as the official code reads it (OpenCV)."""
    if not path.is_file():
        raise InputError(f"--refer_path {path} does not exist; give the character image (png or jpg)")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"--refer_path {path} cannot be decoded as an image; re-save it as PNG or JPEG")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"--refer_path {path} is {image.shape[1]}x{image.shape[0]}, more than the "
                         f"{MAX_IMAGE_PIXELS} pixels wanrt reads; downscale it first")
    return np.ascontiguousarray(image[..., ::-1])


def check_animate_limits(num_frames: int, height: int, width: int, fps: float) -> None:
    """Refuse, before any model runs, a folder `wanrt generate --task animate-14B` could not read."""
    most = min(MAX_FRAMES, MAX_VIDEO_TOTAL_PIXELS // (height * width))
    if num_frames > most:
        raise InputError(f"--video_path gives {num_frames} frames at {fps:g} fps but the Animate pipeline reads "
                         f"at most {most} frames of {width}x{height}; trim the video, lower --fps or "
                         "--resolution_area")


def _animation(frames: list[np.ndarray], reference: np.ndarray, models: PrepModels, options: PrepOptions,
               staging: Path) -> dict[str, list[np.ndarray]]:
    with phase(f"pose estimation ({len(frames) + 1} images)"):
        reference_pose = models.pose([reference])[0]
        template_poses = models.pose(frames)
    faces = [face_crop(frame, pose["keypoints_face"]) for frame, pose in zip(frames, template_poses)]
    if options.retarget:
        edited = _edited_poses(frames, reference, template_poses, reference_pose, models, staging) \
            if options.use_flux else ()
        # The official code estimates the first frame's pose in a call of its own: the
        # retargeting reads that copy and the sequence separately.
        poses = retarget_poses(_copy_pose(template_poses[0]), reference_pose, template_poses, *edited)
        drawn = [draw_pose(np.zeros_like(reference), pose) for pose in poses]
    else:
        height, width = reference.shape[:2]
        drawn = [letterbox(draw_pose(np.zeros_like(frames[0]), PoseMeta.from_normalized(pose)), height, width)
                 for pose in template_poses]
    return {"face": faces, "pose": drawn}


def _edited_poses(frames, reference, template_poses, reference_pose, models: PrepModels, staging: Path):
    """FLUX-Kontext's standard-pose edits of the reference and of the template's second frame
    (saved as refer_edit.png / tpl_edit.png, as official), and their poses."""
    from wanrt.animate_prep.flux_edit import editing_prompts

    template_prompt, reference_prompt = editing_prompts(template_poses, reference_pose)
    with phase("FLUX.1-Kontext: editing the reference"):
        reference_edit = models.editor.edit(reference, reference_prompt)
    template_frame = frames[1] if len(frames) > 1 else frames[0]
    with phase("FLUX.1-Kontext: editing the template"):
        template_edit = models.editor.edit(template_frame, template_prompt)
    for name, image in (("refer_edit.png", reference_edit), ("tpl_edit.png", template_edit)):
        cv2.imwrite(str(staging / name), image[..., ::-1])
    return models.pose([template_edit])[0], models.pose([reference_edit])[0]


def _replacement(frames: list[np.ndarray], models: PrepModels, options: PrepOptions) -> dict[str, list[np.ndarray]]:
    height, width = frames[0].shape[:2]
    with phase(f"pose estimation ({len(frames)} images)"):
        template_poses = models.pose(frames)
    faces = [face_crop(frame, pose["keypoints_face"]) for frame, pose in zip(frames, template_poses)]
    # The official canvas is zeros shaped like the reference letterboxed to the frames: this.
    drawn = [draw_pose(np.zeros((height, width, 3), np.uint8), PoseMeta.from_normalized(pose))
             for pose in template_poses]
    with phase(f"SAM2 masks ({len(frames)} frames)"):
        masks = person_masks(models.sam2, frames, template_poses)
    hidden = [replacement_mask(mask, options.kernel_size, options.iterations, options.w_len, options.h_len)
              for mask in masks]
    backgrounds = [frame * (1 - mask[:, :, None]) for frame, mask in zip(frames, hidden)]
    mask_images = [np.repeat(mask[:, :, None] * 255, 3, axis=2) for mask in hidden]
    return {"face": faces, "pose": drawn, "bg": backgrounds, "mask": mask_images}


def _copy_pose(pose: dict) -> dict:
    return {key: value.copy() if isinstance(value, np.ndarray) else value for key, value in pose.items()}


def _parent(save_path: Path) -> Path:
    """The folder the staging folder goes in: beside `save_path`, so the final moves are renames."""
    parent = save_path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _move_into(staging: Path, save_path: Path, stale: tuple[str, ...]) -> None:
    """Move every staged file into `save_path`, replacing files of an earlier run; files an
    animation run does not write but a replacement run left (`stale`) are removed, so the
    folder never mixes two runs."""
    save_path.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (save_path / name).unlink(missing_ok=True)
    for path in staging.iterdir():
        path.replace(save_path / path.name)
