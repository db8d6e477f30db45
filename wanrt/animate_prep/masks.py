"""Replacement masks: SAM2 segments the person from a few pose clicks, then the mask is grown
and squared off so the background video carries no trace of the template person.

SAM2 comes from the `sam2` package (an optional extra), used through its video predictor as
the official preprocessor uses it; OpenCV dilates the mask as the official code does.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import cv2
import numpy as np

# The official preprocessor's SAM2: sam2_hiera_large.pt with the Hiera-L config.
SAM2_CONFIG = "configs/sam2/sam2_hiera_l.yaml"
# SAM2 keeps the features of every frame of a session in memory: the official code tracks at
# most this many frames per session.
FRAMES_PER_SESSION = 400
# Body points clicked on the person (OpenPose order): nose, neck, shoulders, hips and knees.
CLICKED_BODY_POINTS = (0, 1, 2, 5, 8, 11, 10, 13)
_IMAGE_MEAN = (0.485, 0.456, 0.406)
_IMAGE_STD = (0.229, 0.224, 0.225)


def load_sam2(checkpoint: Path | None, device: str, config: str = SAM2_CONFIG, overrides: tuple[str, ...] = ()):
    """SAM2's video predictor built as the official preprocessor builds it (sam2's video
    postprocessing on). `overrides` are Hydra overrides of the model config (the tests build
    a tiny SAM2 with them)."""
    from sam2.build_sam import build_sam2_video_predictor

    return build_sam2_video_predictor(config, None if checkpoint is None else str(checkpoint), device=device,
                                      hydra_overrides_extra=list(overrides))


def person_masks(predictor, frames: list[np.ndarray], metas: list[dict]) -> list[np.ndarray]:
    """One uint8 {0, 1} mask [H, W] per frame: SAM2 tracks the person clicked at the pose's
    body points on a few key frames of each session of up to FRAMES_PER_SESSION frames."""
    masks = []
    for start in range(0, len(frames), FRAMES_PER_SESSION):
        session_frames = frames[start:start + FRAMES_PER_SESSION]
        session_metas = metas[start:start + FRAMES_PER_SESSION]
        state = _start_session(predictor, session_frames)
        # Clicks are scaled by the first frame's size, as the official code does.
        size = np.array([[session_metas[0]["width"], session_metas[0]["height"]]])
        for frame_index in key_frames(len(session_frames)):
            body = session_metas[frame_index]["keypoints_body"]
            points = (body[list(CLICKED_BODY_POINTS), :2] * size).astype(np.int32)
            predictor.add_new_points_or_box(inference_state=state, frame_idx=frame_index, obj_id=1, points=points,
                                            labels=np.ones(len(points), np.int32))
        tracked = {index: logits[0, 0] > 0.0 for index, _, logits in predictor.propagate_in_video(state)}
        masks.extend(tracked[index].cpu().numpy().astype(np.uint8) for index in range(len(session_frames)))
    return masks


def key_frames(num_frames: int) -> list[int]:
    """The frames clicked: every (n // 4)-th frame when a session has more than 4 frames (so
    5 to 7 frames click every frame), else only the first (the official rule)."""
    clicked = 4 if num_frames > 4 else 1
    return list(range(0, num_frames, num_frames // clicked))


def _start_session(predictor, frames: list[np.ndarray]) -> dict:
    """sam2's `init_state` reads a video only from a file or a JPEG folder; the official
    preprocessor feeds the decoded frames from memory (its own `init_state_v2`). For this one
    call we hand sam2 a loader of the in-memory frames instead of copying its session layout."""
    import sam2.sam2_video_predictor

    def load_frames(video_path, image_size, offload_video_to_cpu, compute_device, **_):
        images = torch_images(frames, image_size)
        return images.to(compute_device), frames[0].shape[0], frames[0].shape[1]

    with mock.patch.object(sam2.sam2_video_predictor, "load_video_frames", load_frames):
        return predictor.init_state(video_path="frames in memory")


def torch_images(frames: list[np.ndarray], image_size: int):
    """SAM2's input: each RGB frame resized by PIL to a square (PIL's default filter, as
    sam2's own loaders), in [0, 1], normalized with ImageNet statistics; float32 [T, 3, S, S]."""
    import torch
    from PIL import Image

    images = torch.zeros(len(frames), 3, image_size, image_size, dtype=torch.float32)
    for index, frame in enumerate(frames):
        resized = np.array(Image.fromarray(frame.astype(np.uint8)).convert("RGB").resize((image_size, image_size)))
        images[index] = torch.from_numpy(resized / 255.0).permute(2, 0, 1)
    mean = torch.tensor(_IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(_IMAGE_STD, dtype=torch.float32)[:, None, None]
    return (images - mean) / std


def replacement_mask(mask: np.ndarray, kernel_size: int = 7, iterations: int = 3, columns: int = 1,
                     rows: int = 1) -> np.ndarray:
    """The mask the replacement hides: SAM2's mask dilated `iterations` times by a square
    `kernel_size` kernel, then every cell of a `columns` x `rows` grid over the mask's box that
    touches the mask filled whole. With `iterations` 0 SAM2's mask is used as it is."""
    if iterations <= 0:
        return mask
    grown = cv2.dilate(mask, np.ones((kernel_size, kernel_size), np.uint8), iterations=iterations)
    return fill_touched_cells(grown, columns, rows)


def fill_touched_cells(mask: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """Official `get_aug_mask` (in place, returned): the box spans min..max of the mask's
    pixels, the last row and column excluded, as the official slices do. An empty mask (SAM2
    lost the person) or a box narrower than the grid is returned unchanged, where the
    official code stops with an error."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask
    x0, y0, x1, y1 = np.array([xs.min(), ys.min(), xs.max(), ys.max()]).astype(np.int32)
    cell_w, cell_h = np.int32((x1 - x0) / columns), np.int32((y1 - y0) / rows)
    if cell_w <= 0 or cell_h <= 0:
        return mask
    for left in range(x0, x1, cell_w):
        right = min(left + cell_w, x1)
        for top in range(y0, y1, cell_h):
            bottom = min(top + cell_h, y1)
            if mask[top:bottom, left:right].sum() > 0:
                mask[top:bottom, left:right] = 1
    return mask
