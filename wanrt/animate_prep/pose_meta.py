"""One person's whole-body 2D pose in pixels, the record every preprocessing stage passes on.

The keypoint sets follow the official preprocessor's layout (its ``AAPoseMeta``): 20 body
points in OpenPose order (COCO-WholeBody's 17 body points regrouped, with the neck as the
shoulders' midpoint and two foot points), 21 points per hand, 69 face points (68 landmarks
after one leading point). Each set carries one confidence per point.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

# COCO-WholeBody index pairs averaged into the 20 OpenPose-order body points: a point that
# exists in COCO is paired with itself; the neck is shoulders 5 and 6; each foot point is the
# mean of two toe points.
BODY_FROM_WHOLEBODY = (
    (0, 0), (6, 5), (6, 6), (8, 8), (10, 10), (5, 5), (7, 7), (9, 9), (12, 12), (14, 14),
    (16, 16), (11, 11), (13, 13), (15, 15), (2, 2), (1, 1), (4, 4), (3, 3), (17, 18), (20, 21),
)
LEFT_HAND = slice(91, 112)
RIGHT_HAND = slice(112, 133)
FACE = slice(22, 91)


@dataclass
class PoseMeta:
    """Keypoints in pixels of a ``width`` x ``height`` image; ``*_p`` are the confidences."""

    width: float
    height: float
    kps_body: np.ndarray
    kps_body_p: np.ndarray
    kps_lhand: np.ndarray
    kps_lhand_p: np.ndarray
    kps_rhand: np.ndarray
    kps_rhand_p: np.ndarray
    kps_face: np.ndarray | None = None
    kps_face_p: np.ndarray | None = None

    @classmethod
    def from_normalized(cls, meta: dict) -> PoseMeta:
        """From a pose dict in normalized coordinates (what ``pose_metas_from_keypoints`` returns)."""
        size = (meta["width"], meta["height"])
        face = meta.get("keypoints_face")
        return cls(
            width=meta["width"], height=meta["height"],
            kps_body=meta["keypoints_body"][:, :2] * size, kps_body_p=meta["keypoints_body"][:, 2],
            kps_lhand=meta["keypoints_left_hand"][:, :2] * size, kps_lhand_p=meta["keypoints_left_hand"][:, 2],
            kps_rhand=meta["keypoints_right_hand"][:, :2] * size, kps_rhand_p=meta["keypoints_right_hand"][:, 2],
            kps_face=None if face is None else face[:, :2] * size,
            kps_face_p=None if face is None else face[:, 2],
        )

    def copy(self) -> PoseMeta:
        return copy.deepcopy(self)


def split_wholebody(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body, left hand, right hand and face sets of one [133, 3] COCO-WholeBody keypoint array."""
    first, second = zip(*BODY_FROM_WHOLEBODY)
    body = (keypoints[list(first)] + keypoints[list(second)]) / 2
    return body, keypoints[LEFT_HAND].copy(), keypoints[RIGHT_HAND].copy(), keypoints[FACE].copy()


def pose_metas_from_keypoints(keypoints: np.ndarray, width: int, height: int) -> list[dict]:
    """Per-frame pose dicts in normalized coordinates from [frames, 133, 3] pixel keypoints.

    A frame whose every body point lies off the image to the left or above (the pose model
    found nobody) keeps the previous frame's body, as the official preprocessor does.
    """
    metas = []
    last_body = None
    for frame_keypoints in keypoints:
        normalized = frame_keypoints.copy()
        normalized[:, 0] /= width
        normalized[:, 1] /= height
        body, left_hand, right_hand, face = split_wholebody(normalized)
        if body[:, :2].min(axis=1).max() < 0 and last_body is not None:
            body = last_body
        last_body = body
        metas.append({"width": width, "height": height, "keypoints_body": body,
                      "keypoints_left_hand": left_hand, "keypoints_right_hand": right_hand,
                      "keypoints_face": face})
    return metas
