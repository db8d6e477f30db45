"""The pose condition image: one person's skeleton drawn onto a black canvas.

Pixel-identical to the official preprocessor's ``draw_aapose_by_meta_new`` with the defaults
``preprocess_data.py`` uses (confidence threshold 0.5, "v2" stick widths, hands and head
drawn). Every coordinate goes through the same float operations and truncations as there,
because one pixel of rounding moves a whole limb's outline.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from wanrt.animate_prep.pose_meta import PoseMeta

# A point below this confidence is not drawn, nor any limb or bone that touches it.
CONFIDENCE_THRESHOLD = 0.5

# Limbs as index pairs into the 20 OpenPose-order body points (see pose_meta.py); limb i is
# filled with 60% of point i's colour.
BODY_LIMBS = (
    (1, 2), (1, 5),  # neck to shoulders
    (2, 3), (3, 4), (5, 6), (6, 7),  # right arm, left arm
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),  # right leg, left leg
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),  # neck to nose, eyes and ears
    (13, 18), (10, 19),  # ankles to toes
)
# One colour per body point (RGB): an 18-step hue ramp, then olive for the two toes.
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
    (200, 200, 0), (100, 100, 0),
)
LIMB_COLORS = tuple(tuple(int(channel * 0.6) for channel in color) for color in BODY_COLORS)

# Hand bones: wrist (0) to each finger's base, then along the finger, thumb first.
HAND_BONES = tuple(
    (0 if joint == 0 else 4 * finger + joint, 4 * finger + joint + 1)
    for finger in range(5) for joint in range(4)
)
HAND_POINT_COLOR = (0, 0, 255)


def _full_hue_rgb(hue: float) -> tuple[float, float, float]:
    """Unrounded 0..255 RGB of a fully saturated, full-value hue in [0, 1).

    The same float operations as matplotlib's ``hsv_to_rgb`` (which the official calls), so
    that OpenCV rounds each channel to the same byte.
    """
    sector_position = hue * 6.0
    sector = int(sector_position)
    fraction = sector_position - sector
    rising, falling = 1.0 - (1.0 - fraction), 1.0 - fraction
    rgb = (
        (1.0, rising, 0.0), (falling, 1.0, 0.0), (0.0, 1.0, rising),
        (0.0, falling, 1.0), (rising, 0.0, 1.0), (1.0, 0.0, falling),
    )[sector]
    return tuple(channel * 255 for channel in rgb)


# Bone i of a hand gets hue i / 20.
HAND_BONE_COLORS = tuple(_full_hue_rgb(bone / len(HAND_BONES)) for bone in range(len(HAND_BONES)))


def _with_confidence(points: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """[N, 3] rows of x, y, confidence in one promoted dtype, the one the drawing math runs in."""
    return np.column_stack([points, confidence])


def _draw_body(canvas: np.ndarray, body: np.ndarray, stickwidth: int) -> None:
    for (start, end), color in zip(BODY_LIMBS, LIMB_COLORS):
        (x1, y1, p1), (x2, y2, p2) = body[start], body[end]
        if p1 < CONFIDENCE_THRESHOLD or p2 < CONFIDENCE_THRESHOLD:
            continue
        # A limb is an ellipse from one point to the other with half-width stickwidth. The
        # centre, half-length and angle are truncated to integers as the official does, from
        # the same numpy-scalar arithmetic (math.hypot or Python floats can differ in the last
        # bit, which moves a truncation).
        center = (int((x1 + x2) / 2), int((y1 + y2) / 2))
        length = ((y1 - y2) ** 2 + (x1 - x2) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        outline = cv2.ellipse2Poly(center, (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, outline, color)
    for (x, y, confidence), color in zip(body, BODY_COLORS):
        if confidence >= CONFIDENCE_THRESHOLD:
            cv2.circle(canvas, (int(x), int(y)), stickwidth, color, thickness=-1)


def _pixel(x, y) -> tuple[int, int]:
    return int(x), int(y)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, stickwidth: int) -> None:
    # Unlike the body, hand points in pixel row or column 0 or beyond the top or left border
    # are dropped (the official's "> 0.01" test on truncated coordinates).
    for (start, end), color in zip(HAND_BONES, HAND_BONE_COLORS):
        (x1, y1, p1), (x2, y2, p2) = hand[start], hand[end]
        if p1 < CONFIDENCE_THRESHOLD or p2 < CONFIDENCE_THRESHOLD:
            continue
        start_pixel, end_pixel = _pixel(x1, y1), _pixel(x2, y2)
        if min(*start_pixel, *end_pixel) >= 1:
            cv2.line(canvas, start_pixel, end_pixel, color, thickness=stickwidth)
    for x, y, confidence in hand:
        if confidence >= CONFIDENCE_THRESHOLD and min(_pixel(x, y)) >= 1:
            cv2.circle(canvas, _pixel(x, y), stickwidth, HAND_POINT_COLOR, thickness=-1)


def draw_pose(canvas: np.ndarray, meta: PoseMeta) -> np.ndarray:
    """Draw ``meta``'s body and both hands onto ``canvas`` (uint8 HxWx3 RGB) and return it.

    Draws in place and returns the same array, as the official does; callers pass a fresh
    zeros canvas per frame. Coordinates are pixels of the canvas (``meta.width``/``height``
    are not consulted); points off the canvas are clipped by OpenCV. The face is not drawn.
    """
    # "v2" widths: thin strokes that grow by one pixel per 200 pixels of the shorter side
    # beyond the first 400, hands half as thick as the body.
    body_stickwidth = max(min(canvas.shape[:2]) // 200 - 1, 1)
    hand_stickwidth = max(body_stickwidth // 2, 1)
    _draw_body(canvas, _with_confidence(meta.kps_body, meta.kps_body_p), body_stickwidth)
    _draw_hand(canvas, _with_confidence(meta.kps_lhand, meta.kps_lhand_p), hand_stickwidth)
    _draw_hand(canvas, _with_confidence(meta.kps_rhand, meta.kps_rhand_p), hand_stickwidth)
    return canvas
