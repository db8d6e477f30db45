"""Retargeting the driving video's poses onto the reference character's body proportions.

Animate-14B draws the driving motion as pose images. Drawn with the driver's own skeleton,
a short character would be given long legs; so every bone of every frame is rescaled to
the reference person's bone length (keeping its angle), the skeleton is moved so that its
feet (or, when legs are not in view, its neck) land where the reference person's are, and
the hands are scaled and carried along with their wrists.

With ``--use_flux`` the bone length ratios come instead from FLUX-Kontext redrawings of
the driving video's first frame and of the character image in one standard pose (arms
down, facing the camera), where bones are foreshortened alike; everything else (scale,
framing, anchor) still comes from the poses as detected.

This is the official ``get_retarget_pose``, and its numerics are kept operation for
operation, including its quirks: the output hands are those of the driving video's
opposite side (``kps_lhand`` holds the right hand, placed at the right wrist), the first
frame alone gets a ground correction, and hand points are truncated to whole pixels.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

from wanrt.animate_prep.pose_meta import PoseMeta

# Body points used by name (OpenPose order, see pose_meta).
NOSE, NECK = 0, 1
RIGHT_SHOULDER, LEFT_SHOULDER = 2, 5
RIGHT_WRIST, LEFT_WRIST = 4, 7
RIGHT_HIP, RIGHT_ANKLE = 8, 10
LEFT_HIP, LEFT_ANKLE = 11, 13
LEFT_TOE, RIGHT_TOE = 18, 19
HEAD_POINTS = (NOSE, 14, 15, 16, 17)  # nose, eyes, ears

# The skeleton as (parent, child) bones in the order it is rebuilt from the neck outwards:
# a child is placed only after its parent has been.
BONES = (
    (NECK, 2), (NECK, 5),                     # shoulders
    (2, 3), (3, RIGHT_WRIST),                 # right arm
    (5, 6), (6, LEFT_WRIST),                  # left arm
    (NECK, RIGHT_HIP), (RIGHT_HIP, 9), (9, RIGHT_ANKLE),   # right leg
    (NECK, LEFT_HIP), (LEFT_HIP, 12), (12, LEFT_ANKLE),    # left leg
    (NECK, NOSE), (NOSE, 14), (14, 16), (NOSE, 15), (15, 17),  # head: nose, eyes, ears
    (LEFT_ANKLE, LEFT_TOE),
    (RIGHT_ANKLE, RIGHT_TOE),
)
# Indices into BONES of mirror-image bones: both get the larger of their two length ratios,
# so the retargeted body stays symmetric.
MIRRORED_BONES = ((0, 1), (2, 4), (3, 5), (6, 9), (7, 10), (8, 11), (17, 18))
# Nose-to-eye and eye-to-ear bones: the two sides get their mean ratio.
AVERAGED_BONES = ((13, 15), (14, 16))
# (foot bone, shin bone): a retargeted foot is never longer than half its shin.
FOOT_AND_SHIN_BONES = ((18, 8), (17, 11))
FOOT_TO_SHIN_MAX = 0.5

# Confidence a point needs to count for the person's height (which sets the overall scale).
HEIGHT_POINT_SCORE = 0.5
# Confidence hips and ankles need for the body to count as in view.
IN_VIEW_SCORE = 0.4
# Hand points below this confidence are dropped.
HAND_POINT_SCORE = 0.4


class Framing(IntEnum):
    """How much of a person is in view; the pair of poses is only as framed as the lesser."""

    HALF_BODY = 0          # no hips: the neck anchors the skeleton
    THREE_QUARTER_BODY = 1  # hips but no ankles: still the neck
    FULL_BODY = 2          # hips and ankles: the ground under the feet anchors it


def retarget_poses(
    template_first: dict,
    reference: dict,
    template: list[dict],
    template_edit: dict | None = None,
    reference_edit: dict | None = None,
) -> list[PoseMeta]:
    """The ``template`` frames' motion on the ``reference`` person's body, in its image.

    ``template_first`` is the driving video's first frame (its bones set the length ratios
    and the anchor), ``reference`` the character image's pose. ``template_edit`` and
    ``reference_edit``, given together or not at all, are the poses of the FLUX-edited
    first frame and character image; they then set the bone length ratios. All are
    normalized pose dicts as ``pose_metas_from_keypoints`` returns them. The inputs are not
    modified. The output hands have NaN coordinates and zero confidence where a point was
    dropped (the official code leaves None there).
    """
    if (template_edit is None) != (reference_edit is None):
        raise ValueError("template_edit and reference_edit must be given together")
    first = _Pose(template_first)
    target = _Pose(reference)

    scale = _person_height_ratio(first, target)
    # The reference skeleton brought to the driving video's scale; dimensions truncate.
    target_width, target_height = int(target.width * scale), int(target.height * scale)
    target_pixels = target.normalized * (target_width, target_height)

    framing = min(_framing(target), _framing(first))
    if template_edit is None:
        ratios = _bone_ratios(first.pixels, target_pixels)
    else:
        ratios = _edited_bone_ratios(first, target, _Pose(template_edit), _Pose(reference_edit))
    # The anchor comes from the first frame regrown without the foot cap (as officially).
    first_retargeted = _rebuild_skeleton(first.pixels, _bone_lengths_and_angles(first.pixels, ratios))

    if framing == Framing.FULL_BODY:
        target_ground_y = max(
            (target.normalized[LEFT_ANKLE, 1] + target.normalized[LEFT_TOE, 1]) / 2,
            (target.normalized[RIGHT_ANKLE, 1] + target.normalized[RIGHT_TOE, 1]) / 2,
        ) * target_height
        first_ground_y = max(first_retargeted[RIGHT_ANKLE, 1], first_retargeted[LEFT_ANKLE, 1])
        target_ground_x = ((target.normalized[RIGHT_HIP, 0] + target.normalized[LEFT_HIP, 0])
                           * target_width / 2)
        anchor_x = (first_retargeted[RIGHT_HIP, 0] + first_retargeted[LEFT_HIP, 0]) / 2
        shift = (anchor_x - target_ground_x, first_ground_y - target_ground_y)
    else:
        anchor_x = first_retargeted[NECK, 0]
        shift = (anchor_x - target.normalized[NECK, 0] * target_width,
                 first_retargeted[NECK, 1] - target.normalized[NECK, 1] * target_height)

    hand_ratio = max(ratios[0], ratios[1]) / scale
    retargeted = []
    for index, meta in enumerate(template):
        frame = _Pose(meta)
        skeleton = _retarget_skeleton(frame.pixels, ratios)
        frame_shift = shift
        if index == 0:
            # The official code corrects the horizontal anchor of the first frame only; in
            # the pipeline that frame is ``template_first`` itself and the correction is zero.
            if framing == Framing.FULL_BODY:
                correction = (skeleton[RIGHT_HIP, 0] + skeleton[LEFT_HIP, 0]) / 2 - anchor_x
                frame_shift = (shift[0] + correction, shift[1])
            elif framing == Framing.HALF_BODY:
                frame_shift = (shift[0] + (skeleton[NECK, 0] - anchor_x), shift[1])
        body = (skeleton - frame_shift) / scale
        retargeted.append(_pose_meta(frame, body, hand_ratio, reference_size=(target.width, target.height)))
    return retargeted


class _Pose:
    """One pose dict's points as float64 arrays (so float32 inputs compute as the official's
    lists of Python floats do): body in normalized and in pixel units, hands in normalized."""

    def __init__(self, meta: dict):
        self.width, self.height = meta["width"], meta["height"]
        size = (self.width, self.height)
        body = np.asarray(meta["keypoints_body"], dtype=np.float64)
        self.normalized, self.body_scores = body[:, :2], body[:, 2]
        self.pixels = self.normalized * size
        # The official code takes the hands to pixels and back: x * width / width.
        self.hands = {}
        for side in ("left", "right"):
            hand = np.asarray(meta[f"keypoints_{side}_hand"], dtype=np.float64)
            self.hands[side] = (hand[:, :2] * size / size, hand[:, 2])


def _person_height_ratio(template: _Pose, reference: _Pose) -> float:
    """How much taller the driving person stands in pixels than the reference person.

    Nose to ankles when both show them confidently, else nose to hips, else the ratio of
    the square roots of the image areas.
    """
    heights = _person_heights(template, reference)
    if heights is None:
        return np.sqrt(template.height * template.width) / np.sqrt(reference.height * reference.width)
    template_height, reference_height = heights
    return 1.0 * template_height / reference_height


def _person_heights(template: _Pose, reference: _Pose) -> tuple | None:
    """Both persons' heights in pixels, nose to ankles or else nose to hips, from the
    first pair of points both poses show confidently; None when neither is."""
    for lower in ((RIGHT_ANKLE, LEFT_ANKLE), (RIGHT_HIP, LEFT_HIP)):
        points = (NOSE, *lower)
        poses = (template, reference)
        if all(pose.body_scores[point] > HEIGHT_POINT_SCORE for pose in poses for point in points):
            return tuple(
                pose.height * abs((pose.normalized[lower[0], 1] + pose.normalized[lower[1], 1]) / 2
                                  - pose.normalized[NOSE, 1])
                for pose in poses
            )
    return None


def _framing(pose: _Pose) -> Framing:
    """Hips and ankles count as in view when confident and not below the image's bottom."""

    def in_view(*points):
        return all(pose.normalized[point, 1] <= 1 and pose.body_scores[point] >= IN_VIEW_SCORE
                   for point in points)

    if in_view(RIGHT_ANKLE, LEFT_ANKLE) and in_view(RIGHT_HIP, LEFT_HIP):
        return Framing.FULL_BODY
    if in_view(RIGHT_HIP, LEFT_HIP):
        return Framing.THREE_QUARTER_BODY
    return Framing.HALF_BODY


def _bone_length(points: np.ndarray, start: int, end: int):
    # ``** 0.5`` on scalars (C pow), not np.sqrt, to round as the official code does.
    return ((points[start, 0] - points[end, 0]) ** 2 + (points[start, 1] - points[end, 1]) ** 2) ** 0.5


def _bone_ratios(template_pixels: np.ndarray, reference_pixels: np.ndarray,
                 template_zoom=1, reference_zoom=1) -> list:
    """Reference-to-template length ratio of every bone, made left/right symmetric.

    Each length is first multiplied by its pose's zoom (an edited pose's length brought back
    to the detected person's size; the default 1 leaves it exact).
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero-length bone gives inf/nan, as officially
        ratios = [1.0 * _bone_length(reference_pixels, *bone) * reference_zoom
                  / _bone_length(template_pixels, *bone) / template_zoom
                  for bone in BONES]
    for one, other in MIRRORED_BONES:
        ratios[one] = ratios[other] = max(ratios[one], ratios[other])
    for one, other in AVERAGED_BONES:
        ratios[one] = ratios[other] = (ratios[one] + ratios[other]) / 2
    return ratios


def _edited_bone_ratios(first: _Pose, target: _Pose, first_edit: _Pose, target_edit: _Pose) -> list:
    """The bone ratios measured on the FLUX-edited poses instead of the detected ones.

    The edited reference is brought to the edited template's scale as the detected one is
    to the template's. When that scale falls back to the image sizes (no height measured
    in the edits), FLUX's own zoom of each image is undone as well, estimated from head
    width and shoulder breadth against the detected pose. (The official code's repairs of
    missing points never act here: pose dicts from ``pose_metas_from_keypoints`` have
    every point.)
    """
    edit_scale = _person_height_ratio(first_edit, target_edit)
    if _person_heights(first_edit, target_edit) is None:
        first_zoom, target_zoom = _edit_zoom(first, first_edit), _edit_zoom(target, target_edit)
    else:
        first_zoom = target_zoom = 1
    # Dimensions truncate, as for the detected reference.
    target_edit_size = (int(target_edit.width * edit_scale), int(target_edit.height * edit_scale))
    return _bone_ratios(first_edit.pixels, target_edit.normalized * target_edit_size,
                        template_zoom=first_zoom, reference_zoom=target_zoom)


def _edit_zoom(pose: _Pose, edited: _Pose):
    """How much larger the person is in ``pose`` than in its FLUX edit: the larger of the
    head width (normalized, across nose, eyes and ears) and shoulder breadth (pixels)
    ratios."""
    def head_width(points):
        return points[HEAD_POINTS, 0].max() - points[HEAD_POINTS, 0].min()

    head_ratio = head_width(pose.normalized) / head_width(edited.normalized)
    shoulder_ratio = (_bone_length(pose.pixels, LEFT_SHOULDER, RIGHT_SHOULDER)
                      / _bone_length(edited.pixels, LEFT_SHOULDER, RIGHT_SHOULDER))
    return max(head_ratio, shoulder_ratio)


def _bone_lengths_and_angles(pixels: np.ndarray, ratios: list) -> list[tuple]:
    """Every bone's retargeted length and its direction in degrees (child to parent)."""
    lengths_and_angles = []
    for (parent, child), ratio in zip(BONES, ratios):
        to_parent = pixels[parent] - pixels[child]
        angle = math.degrees(math.atan2(to_parent[1], to_parent[0]))
        lengths_and_angles.append((_bone_length(pixels, parent, child) * ratio, angle))
    return lengths_and_angles


def _rebuild_skeleton(pixels: np.ndarray, lengths_and_angles: list[tuple]) -> np.ndarray:
    """The skeleton regrown from the neck with the given bone lengths and angles."""
    rebuilt = pixels.copy()
    for (parent, child), (length, angle) in zip(BONES, lengths_and_angles):
        rebuilt[child, 0] = rebuilt[parent, 0] - length * math.cos(math.radians(angle))
        rebuilt[child, 1] = rebuilt[parent, 1] - length * math.sin(math.radians(angle))
    return rebuilt


def _retarget_skeleton(pixels: np.ndarray, ratios: list) -> np.ndarray:
    """One frame's skeleton regrown with the retargeted bone lengths, feet capped."""
    lengths_and_angles = _bone_lengths_and_angles(pixels, ratios)
    for foot, shin in FOOT_AND_SHIN_BONES:
        shin_cap = lengths_and_angles[shin][0] * FOOT_TO_SHIN_MAX
        if lengths_and_angles[foot][0] > shin_cap:
            lengths_and_angles[foot] = (shin_cap, lengths_and_angles[foot][1])
    return _rebuild_skeleton(pixels, lengths_and_angles)


def _pose_meta(frame: _Pose, body: np.ndarray, hand_ratio, reference_size: tuple) -> PoseMeta:
    """The output record: the retargeted ``body`` (reference pixels) with the frame's hands
    scaled about their roots and carried by their wrists (and by the root's own offset from
    the wrist when the root was kept)."""
    frame_size = (frame.width, frame.height)
    right = _scale_hand_about_root(*frame.hands["right"], hand_ratio)
    left = _scale_hand_about_root(*frame.hands["left"], hand_ratio)
    right_root, left_root = right[0][0], left[0][0]  # normalized; (-1, -1) when dropped
    right_root_to_wrist = frame.pixels[RIGHT_WRIST] - right_root * frame_size
    right_shift = body[RIGHT_WRIST] - frame.pixels[RIGHT_WRIST]
    if right_root[0] != -1:
        right_shift = right_shift + right_root_to_wrist
    left_shift = body[LEFT_WRIST] - frame.pixels[LEFT_WRIST]
    if left_root[0] != -1:
        left_shift = left_shift + (frame.pixels[LEFT_WRIST] - left_root * frame_size)

    # A right-hand root nearer the left wrist than the right one reads as swapped hands:
    # the right wrist's shift then carries the left hand and the left wrist's the right.
    right_root_to_left_wrist = frame.pixels[LEFT_WRIST] - right_root * frame_size
    if _norm(right_root_to_wrist) > _norm(right_root_to_left_wrist):
        out_left = _place_hand(*left, right_shift, frame_size)
        out_right = _place_hand(*right, left_shift, frame_size)
    else:
        out_left = _place_hand(*right, right_shift, frame_size)
        out_right = _place_hand(*left, left_shift, frame_size)

    width, height = reference_size
    return PoseMeta(
        width=width, height=height,
        # Through normalized coordinates and back, as the official record is built.
        kps_body=body / reference_size * reference_size, kps_body_p=frame.body_scores.copy(),
        kps_lhand=out_left[0], kps_lhand_p=out_left[1],
        kps_rhand=out_right[0], kps_rhand_p=out_right[1],
    )


def _norm(vector: np.ndarray):
    # Scalar ``**`` like _bone_length.
    return (vector[0] ** 2 + vector[1] ** 2) ** 0.5


def _scale_hand_about_root(points: np.ndarray, scores: np.ndarray, ratio) -> tuple[np.ndarray, np.ndarray]:
    """Normalized hand points scaled by ``ratio`` about the root (point 0); dropped points
    become (-1, -1) with score 0."""
    scaled = points * ratio - points[0] * (ratio - 1)
    dropped = scores < HAND_POINT_SCORE
    scaled[dropped] = -1
    return scaled, np.where(dropped, 0.0, scores)


def _place_hand(points: np.ndarray, scores: np.ndarray, shift: np.ndarray, frame_size: tuple):
    """Hand points in output pixels, truncated to whole pixels; NaN where dropped."""
    placed = np.trunc(points * frame_size + shift)
    placed[scores == 0] = np.nan
    return placed, scores
