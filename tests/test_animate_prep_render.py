"""Pose condition images and face crops against the official preprocessor's output.

The golden file holds what the official ``draw_aapose_by_meta_new``, ``get_face_bboxes`` and
crop + ``cv2.resize`` produced for the poses ``person_pose`` generates (see the fixture
folder's README). Everything must match exactly: pixels, box integers, crop bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import FIXTURES

from wanrt.animate_prep.faces import face_box, face_crop
from wanrt.animate_prep.pose_meta import PoseMeta
from wanrt.animate_prep.render import HAND_BONE_COLORS, draw_pose

GOLDEN = FIXTURES / "animate_prep" / "pose_render.npz"
# (height, width): portrait, landscape, a wide strip, and one large enough for 4 px body and
# 2 px hand strokes.
CANVAS_SIZES = ((96, 64), (64, 96), (160, 400), (1008, 1024))
FRAMES = 4

# A person standing in the middle of the image, normalized, in the 20-point OpenPose order.
BODY_TEMPLATE = (
    (0.50, 0.18), (0.50, 0.30), (0.40, 0.30), (0.36, 0.45), (0.34, 0.58), (0.60, 0.30),
    (0.64, 0.45), (0.66, 0.58), (0.44, 0.60), (0.43, 0.77), (0.42, 0.93), (0.56, 0.60),
    (0.57, 0.77), (0.58, 0.93), (0.48, 0.16), (0.52, 0.16), (0.45, 0.17), (0.55, 0.17),
    (0.60, 0.98), (0.40, 0.98),
)
RIGHT_ELBOW, RIGHT_WRIST, LEFT_WRIST, RIGHT_KNEE, LEFT_TOE, RIGHT_TOE, NOSE = 3, 4, 7, 9, 18, 19, 0
# Thumb to little finger of the right hand (image left); the left hand mirrors them.
FINGER_DIRECTIONS = ((-1.0, -0.25), (-0.75, 0.75), (-0.25, 1.0), (0.25, 1.0), (0.75, 0.75))


def _hand(wrist: np.ndarray, mirror: float) -> np.ndarray:
    points = [(*wrist, 0.9)]
    for dx, dy in FINGER_DIRECTIONS:
        for joint in range(1, 5):
            step = 0.025 * joint
            points.append((wrist[0] + mirror * dx * step, wrist[1] + dy * step, 0.9))
    return np.array(points)


def person_pose(frame: int, height: int, width: int) -> dict:
    """A normalized float32 pose dict (as ``pose_metas_from_keypoints`` returns) for a frame.

    Plain arithmetic only (no RNG, no trigonometry), so it is the same on every machine.
    One left-hand point has exactly the threshold confidence throughout. Frame 0 has unsure
    ears and right knee and a stray thumb tip and toe in the top pixel row; frame 1 stands at
    the right border, its face and toes beyond the image and its right elbow at exactly the
    threshold; frame 2 stands at the left border, its right arm and hand beyond it; frame 3
    stands at the top border with an unsure right hand.
    """
    shift = ((0.0, 0.0), (0.44, 0.0), (-0.45, 0.0), (0.1, -0.15))[frame]
    body = np.array(BODY_TEMPLATE) + shift
    body[RIGHT_WRIST, 1] += 0.04 * frame
    body[LEFT_WRIST] -= (0.02 * frame, 0.05 * frame)
    body_confidence = np.full(20, 0.9)
    if frame == 0:
        body_confidence[[16, 17, RIGHT_KNEE]] = (0.3, 0.3, 0.45)
    if frame == 1:
        body[[LEFT_TOE, RIGHT_TOE], 1] = 1.08
        body_confidence[RIGHT_ELBOW] = 0.5
    right_hand = _hand(body[RIGHT_WRIST], 1.0)
    left_hand = _hand(body[LEFT_WRIST], -1.0)
    left_hand[20, 2] = 0.4
    left_hand[8, 2] = 0.5
    right_hand[13, 2] = 0.45
    if frame == 0:
        # A stray thumb tip in the top pixel row: hands drop points there, bodies do not.
        left_hand[4, 1] = 0.6 / height
        body[LEFT_TOE, 1] = 0.6 / height
    if frame == 3:
        right_hand[:, 2] = 0.2
    # Face: a leading non-face point (here the right ankle), then 68 landmarks on an arc
    # around the nose (rational parametrization of an ellipse).
    u = np.linspace(-2.5, 2.5, 68)
    arc = np.stack([(1 - u * u) / (1 + u * u) * 0.07, 2 * u / (1 + u * u) * 0.09], axis=1)
    landmarks = body[NOSE] + (0.0, 0.02) + arc
    face = np.concatenate([body[[10]], landmarks])
    return {
        "width": width, "height": height,
        "keypoints_body": np.column_stack([body, body_confidence]).astype(np.float32),
        "keypoints_left_hand": left_hand.astype(np.float32),
        "keypoints_right_hand": right_hand.astype(np.float32),
        "keypoints_face": np.column_stack([face, np.full(69, 0.9)]).astype(np.float32),
    }


def video_frame(height: int, width: int) -> np.ndarray:
    """A deterministic RGB frame with distinct colours everywhere, to crop faces from."""
    rows, cols = np.mgrid[:height, :width]
    ramp = (cols * 3 + rows * 5)[..., None] + rows[..., None] % 7 * (0, 31, 67) + (0, 85, 170)
    return (ramp % 256).astype(np.uint8)


def _stacked(pose: dict) -> np.ndarray:
    return np.concatenate([pose[key] for key in (
        "keypoints_body", "keypoints_left_hand", "keypoints_right_hand", "keypoints_face")])


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return dict(data)


def test_hand_bone_colors_match_matplotlib_hsv(golden):
    np.testing.assert_array_equal(np.array(HAND_BONE_COLORS), golden["hand_bone_colors"])


@pytest.mark.parametrize("height,width", CANVAS_SIZES)
def test_pose_images_match_official(golden, height, width):
    images = golden[f"image_{height}x{width}"]
    for frame in range(FRAMES):
        pose = person_pose(frame, height, width)
        # The golden images were drawn from exactly these inputs.
        np.testing.assert_array_equal(_stacked(pose), golden[f"pose_{height}x{width}"][frame])
        meta = PoseMeta.from_normalized(pose)
        canvas = np.zeros((height, width, 3), np.uint8)
        drawn = draw_pose(canvas, meta)
        assert drawn is canvas  # in place, as the official
        assert images[frame].any()
        np.testing.assert_array_equal(drawn, images[frame], err_msg=f"frame {frame}")


def test_draw_pose_leaves_meta_unchanged():
    meta = PoseMeta.from_normalized(person_pose(0, 96, 64))
    before = meta.copy()
    draw_pose(np.zeros((96, 64, 3), np.uint8), meta)
    for name in ("kps_body", "kps_body_p", "kps_lhand", "kps_lhand_p", "kps_rhand", "kps_rhand_p"):
        np.testing.assert_array_equal(getattr(meta, name), getattr(before, name))


@pytest.mark.parametrize("height,width", CANVAS_SIZES)
def test_face_boxes_and_crops_match_official(golden, height, width):
    frame_image = video_frame(height, width)
    for frame in range(FRAMES):
        face = person_pose(frame, height, width)["keypoints_face"]
        box = face_box(face, height, width)
        assert all(type(bound) is int for bound in box)
        assert box == tuple(golden[f"face_box_{height}x{width}"][frame])
        crop = face_crop(frame_image, face)
        assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
        digest = hashlib.sha256(crop.tobytes()).hexdigest()
        assert digest == golden[f"face_crop_sha256_{height}x{width}"][frame]


def test_face_box_is_clipped_at_the_image_border(golden):
    height, width = 160, 400
    boxes = [face_box(person_pose(frame, height, width)["keypoints_face"], height, width)
             for frame in range(FRAMES)]
    assert boxes == [tuple(box) for box in golden[f"face_box_{height}x{width}"]]
    # Frame 0's face lies inside, with margin; frame 1's crosses the right border, frame 2's
    # the left, frame 3's the top.
    x1, x2, y1, y2 = boxes[0]
    assert 0 < x1 < x2 < width and 0 < y1 < y2 < height
    assert (boxes[1][1], boxes[2][0], boxes[3][2]) == (width, 0, 0)


def test_face_box_leaves_out_the_leading_point():
    face = person_pose(0, 96, 64)["keypoints_face"]
    moved = face.copy()
    moved[0, :2] = (-5.0, 7.0)
    assert face_box(moved, 96, 64) == face_box(face, 96, 64)
