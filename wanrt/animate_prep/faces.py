"""The face crops the Animate pipeline reads: a box around the face landmarks, resized to 512.

Integer-identical to the official preprocessor's ``get_face_bboxes`` (scale 1.3) and the crop
and ``cv2.resize`` that follow it.
"""

from __future__ import annotations

import cv2
import numpy as np

FACE_CROP_SIZE = 512


def face_box(face_keypoints: np.ndarray, image_height: int, image_width: int,
             scale: float = 1.3) -> tuple[int, int, int, int]:
    """``(x1, x2, y1, y2)`` pixel bounds of the face crop, in that order (slice ``[y1:y2, x1:x2]``).

    ``face_keypoints`` is a pose dict's ``keypoints_face``: [69, 2 or 3] normalized points
    whose first one is not a face landmark (see pose_meta.py) and is left out. The landmarks'
    bounding box is grown to ``scale`` times its area with its aspect ratio kept, evenly left
    and right but three times as far up as down (to take in the forehead), then clipped to the
    image. The bounds are truncated toward zero.
    """
    landmarks = np.asarray(face_keypoints)[1:, :2] * (image_width, image_height)
    left, top = landmarks.min(axis=0)
    right, bottom = landmarks.max(axis=0)
    width, height = right - left, bottom - top
    grown_area = width * height * scale
    grown_width = np.sqrt(grown_area * (width / height))
    grown_height = np.sqrt(grown_area * (height / width))
    side_margin = (grown_width - width) / 2
    down_margin = (grown_height - height) / 4
    return (
        int(max(left - side_margin, 0)), int(min(right + side_margin, image_width)),
        int(max(top - 3 * down_margin, 0)), int(min(bottom + down_margin, image_height)),
    )


def face_crop(frame: np.ndarray, face_keypoints: np.ndarray) -> np.ndarray:
    """The frame's face (see ``face_box``) bilinearly resized to 512x512 pixels."""
    x1, x2, y1, y2 = face_box(face_keypoints, frame.shape[0], frame.shape[1])
    return cv2.resize(frame[y1:y2, x1:x2], (FACE_CROP_SIZE, FACE_CROP_SIZE))
