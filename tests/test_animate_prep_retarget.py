"""Pose retargeting parity with the official ``get_retarget_pose``.

The poses are drawn here from a stick figure, so the goldens' inputs are this file's code:
``retarget_golden.npz`` holds what the official function returned for ``SCENARIOS`` (no
FLUX-edited poses), ``retarget_edit_golden.npz`` for ``EDIT_SCENARIOS`` (with them).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from conftest import FIXTURES

from wanrt.animate_prep.pose_meta import pose_metas_from_keypoints
from wanrt.animate_prep.retarget import Framing, _framing, _person_heights, _Pose, retarget_poses

GOLDEN = FIXTURES / "animate_prep/retarget_golden.npz"
EDIT_GOLDEN = FIXTURES / "animate_prep/retarget_edit_golden.npz"
FRAMES = 6


def stick_figure(width, height, *, neck, unit, build, phase, score=0.9, arm_spread=0.5):
    """[133, 3] COCO-WholeBody keypoints (float32, pixels) of a person facing the camera.

    ``build`` holds bone lengths in ``unit``s; ``phase`` swings the arms and legs;
    ``arm_spread`` (radians) holds the upper arms away from the body.
    """
    kps = np.zeros((133, 3), np.float64)
    kps[:, 2] = score
    neck = np.array(neck, np.float64)

    def limb(start, angle, length):  # angle from straight down, counter-clockwise on screen
        return start + unit * length * np.array([math.sin(angle), math.cos(angle)])

    shoulders = {5: neck + (unit * build["shoulder"], 0.0), 6: neck - (unit * build["shoulder"], 0.0)}
    hips = {11: neck + (unit * build["hip"], unit * build["torso"]),
            12: neck + (-unit * build["hip"], unit * build["torso"])}
    swing = 0.6 * math.sin(phase)
    for side, (sho, elb, wri, hip, kne, ank, toes, sign) in {
        "left": (5, 7, 9, 11, 13, 15, (17, 18, 19), 1.0),
        "right": (6, 8, 10, 12, 14, 16, (20, 21, 22), -1.0),
    }.items():
        kps[sho, :2] = shoulders[sho]
        arm_angle = sign * (arm_spread + swing * sign)
        kps[elb, :2] = limb(kps[sho, :2], arm_angle, build["upper_arm"])
        kps[wri, :2] = limb(kps[elb, :2], arm_angle + sign * 0.7, build["forearm"])
        kps[hip, :2] = hips[hip]
        leg_angle = sign * 0.1 + 0.3 * math.sin(phase + (0 if sign > 0 else math.pi))
        kps[kne, :2] = limb(kps[hip, :2], leg_angle, build["thigh"])
        kps[ank, :2] = limb(kps[kne, :2], leg_angle * 0.5, build["shin"])
        kps[toes[0], :2] = kps[ank, :2] + unit * np.array([sign * 0.5 * build["foot"], 0.3])
        kps[toes[1], :2] = kps[ank, :2] + unit * np.array([sign * 0.8 * build["foot"], 0.2])
        kps[toes[2], :2] = kps[ank, :2] + unit * np.array([-sign * 0.2, 0.25])
        hand = slice(91, 112) if side == "left" else slice(112, 133)
        kps[hand, :2] = hand_points(kps[wri, :2], arm_angle + sign * 0.7, unit * build["hand"])
    nose = neck - (0.0, unit * build["head"])
    kps[0, :2] = nose
    eye = unit * build["head"] * 0.25
    kps[1, :2], kps[2, :2] = nose + (eye, -eye), nose + (-eye, -eye)
    kps[3, :2], kps[4, :2] = nose + (2 * eye, 0.2 * eye), nose + (-2 * eye, 0.2 * eye)
    around = np.linspace(0, 2 * math.pi, 68, endpoint=False)
    kps[23:91, :2] = nose + np.stack([np.cos(around) * 2 * eye, np.sin(around) * 3 * eye], 1)
    return kps.astype(np.float32)


def hand_points(wrist, angle, size):
    """21 hand points: the root just past the wrist, then five fingers of four joints."""
    along = np.array([math.sin(angle), math.cos(angle)])
    across = np.array([along[1], -along[0]])
    points = [wrist + 0.3 * size * along]
    for finger in range(5):
        spread = (finger - 2) * 0.25 * size
        for joint in range(1, 5):
            points.append(points[0] + along * size * (0.4 + 0.2 * joint) + across * spread * (1 + 0.2 * joint))
    return np.array(points)


# The tall person's feet are long enough for the retargeted ones to be capped at half a shin.
TALL = dict(shoulder=1.0, hip=0.6, torso=3.0, upper_arm=1.6, forearm=1.4, thigh=2.2, shin=2.3,
            foot=2.2, head=1.0, hand=0.6)
STOCKY = dict(shoulder=1.3, hip=0.9, torso=2.4, upper_arm=1.2, forearm=1.1, thigh=1.6, shin=1.5,
              foot=0.9, head=1.1, hand=0.8)


def template_sequence(name, first_phase=0.0):
    """Driving frames (96x64) and their first frame for one scenario: a stocky person moving."""
    width, height = 96, 64
    frames = []
    for index in range(FRAMES):
        neck = (48 + 2 * math.sin(index), 14)
        if name == "three_quarter":
            # Standing closer: the legs leave the image below the hips, the ankles unsure.
            kps = stick_figure(width, height, neck=(48, 12), unit=9.0, build=STOCKY, phase=0.5 * index)
            kps[[15, 16, 17, 18, 19, 20, 21, 22], 2] = 0.3
        else:
            kps = stick_figure(width, height, neck=neck, unit=5.5, build=STOCKY, phase=0.5 * index)
        if index == 1:
            kps[3, 2] = 0.1  # an ear not seen
        if index == 2:
            kps[91:112, 2] = 0.2  # the left hand not seen at all
        if index == 3:
            # The right hand detected on the left wrist: the official code swaps the hands.
            kps[112:133, :2] = kps[91:112, :2] + 0.5
        if index == 4:
            kps[112, 2] = 0.3  # the right hand's root dropped, a finger too
            kps[[120, 121], 2] = 0.39
            kps[14, 2] = 0.3
        frames.append(kps)
    first = frames[0]
    if first_phase:
        first = stick_figure(width, height, neck=(45, 15), unit=5.5, build=STOCKY, phase=first_phase)
    return np.stack(frames), first, (width, height)


def reference_pose(name):
    """The character image's pose (64x112): a tall slim person, whole or cut at the waist."""
    width, height = 64, 112
    if name == "upper_body":
        # Hips and legs below the image, found with little confidence: the neck anchors.
        kps = stick_figure(width, height, neck=(32, 50), unit=22.0, build=TALL, phase=0.3)
        kps[11:23, 2] = 0.3
    else:
        kps = stick_figure(width, height, neck=(30, 22), unit=6.5, build=TALL, phase=0.2)
    return kps, (width, height)


# name -> (reference, template, template_first's phase): 0 takes the first template frame, as
# the pipeline does; another phase makes the official first-frame anchor correction non-zero.
SCENARIOS = {
    "full_body": ("full_body", "full_body", 0.0),
    "upper_body": ("upper_body", "full_body", 0.0),
    "three_quarter": ("full_body", "three_quarter", 0.0),
    "distinct_first": ("full_body", "full_body", 1.3),
    "upper_body_distinct_first": ("upper_body", "full_body", 1.3),
}
EXPECTED_FRAMING = {"full_body": Framing.FULL_BODY, "upper_body": Framing.HALF_BODY,
                    "three_quarter": Framing.THREE_QUARTER_BODY, "distinct_first": Framing.FULL_BODY,
                    "upper_body_distinct_first": Framing.HALF_BODY}


def edited_template_first(template_name):
    """The driving video's first frame as FLUX-Kontext redraws it: in the standard pose
    (standing straight, arms down) and, as FLUX does, a little zoomed out and shifted."""
    width, height = 96, 64
    if template_name == "three_quarter":
        # The ankles stay unsure: the edits' heights are measured to the hips.
        kps = stick_figure(width, height, neck=(47, 13), unit=8.4, build=STOCKY, phase=0.0, arm_spread=0.15)
        kps[[15, 16, 17, 18, 19, 20, 21, 22], 2] = 0.3
    else:
        kps = stick_figure(width, height, neck=(46, 15), unit=5.1, build=STOCKY, phase=0.0, arm_spread=0.15)
    return kps, (width, height)


def edited_reference(reference_name):
    """The character image as FLUX-Kontext redraws it in the standard pose."""
    width, height = 64, 112
    if reference_name == "upper_body":
        # Still cut at the waist: no height in the edits, the scale falls back to image sizes.
        kps = stick_figure(width, height, neck=(31, 52), unit=20.5, build=TALL, phase=0.0, arm_spread=0.15)
        kps[11:23, 2] = 0.3
    else:
        kps = stick_figure(width, height, neck=(31, 24), unit=6.2, build=TALL, phase=0.0, arm_spread=0.15)
    return kps, (width, height)


# name -> SCENARIOS entry whose inputs it takes, edited poses added. The edits' height goes
# nose to ankles, nose to hips, or falls back to the image sizes (with the FLUX zoom measured).
EDIT_SCENARIOS = {
    "edit_full_body": "full_body",
    "edit_three_quarter": "three_quarter",
    "edit_upper_body": "upper_body_distinct_first",
}
EDIT_HEIGHT_POINTS = {"edit_full_body": "ankles", "edit_three_quarter": "hips", "edit_upper_body": None}


def edit_scenario_inputs(name):
    """(template_first, reference, template, template_edit, reference_edit)."""
    scenario = EDIT_SCENARIOS[name]
    reference_name, template_name, _ = SCENARIOS[scenario]
    edits = [edited_template_first(template_name), edited_reference(reference_name)]
    return (*scenario_inputs(scenario),
            *(pose_metas_from_keypoints(kps[None], width, height)[0] for kps, (width, height) in edits))


def scenario_inputs(name):
    """(template_first, reference, template) as the pipeline's pose stage hands them over."""
    reference_name, template_name, first_phase = SCENARIOS[name]
    frames, first, (width, height) = template_sequence(template_name, first_phase)
    reference, (ref_width, ref_height) = reference_pose(reference_name)
    return (pose_metas_from_keypoints(first[None], width, height)[0],
            pose_metas_from_keypoints(reference[None], ref_width, ref_height)[0],
            pose_metas_from_keypoints(frames, width, height))


@pytest.mark.parametrize("name", SCENARIOS)
def test_retarget_matches_official(name):
    template_first, reference, template = scenario_inputs(name)
    framing = min(_framing(_Pose(template_first)), _framing(_Pose(reference)))
    assert framing == EXPECTED_FRAMING[name]
    assert_matches_golden(retarget_poses(template_first, reference, template), np.load(GOLDEN), name)


@pytest.mark.parametrize("name", EDIT_SCENARIOS)
def test_retarget_with_flux_edits_matches_official(name):
    inputs = edit_scenario_inputs(name)
    template_edit, reference_edit = _Pose(inputs[3]), _Pose(inputs[4])
    heights = _person_heights(template_edit, reference_edit)
    if EDIT_HEIGHT_POINTS[name] is None:
        assert heights is None
    else:
        # Nose to ankles when those are confident in both edits, else nose to hips.
        ankles = all(pose.body_scores[point] > 0.5 for pose in (template_edit, reference_edit) for point in (10, 13))
        assert heights is not None and ankles == (EDIT_HEIGHT_POINTS[name] == "ankles")
    poses = retarget_poses(*inputs)
    assert_matches_golden(poses, np.load(EDIT_GOLDEN), name)
    # The edits do change the result (the bone ratios come from them).
    assert not np.allclose(poses[1].kps_body, retarget_poses(*inputs[:3])[1].kps_body)


def test_retarget_wants_both_edits_or_none():
    template_first, reference, template, template_edit, reference_edit = edit_scenario_inputs("edit_full_body")
    with pytest.raises(ValueError):
        retarget_poses(template_first, reference, template, template_edit=template_edit)
    with pytest.raises(ValueError):
        retarget_poses(template_first, reference, template, reference_edit=reference_edit)


def assert_matches_golden(poses, golden, name):
    assert len(poses) == FRAMES
    for index, pose in enumerate(poses):
        assert (pose.width, pose.height) == tuple(golden[f"{name}/size"][index])
        assert pose.kps_face is None
        for field in ("kps_body", "kps_body_p", "kps_lhand", "kps_lhand_p", "kps_rhand", "kps_rhand_p"):
            expected = golden[f"{name}/{field}"][index]
            np.testing.assert_allclose(getattr(pose, field), expected, rtol=0, atol=1e-9,
                                       err_msg=f"{name} frame {index} {field}")


def test_retarget_covers_dropped_and_swapped_hands():
    """The goldens exercise the hand branches: a hand unseen, a root dropped (frame 3, both
    hands on the left wrist, takes the official swap branch)."""
    golden = np.load(GOLDEN)
    left, right = golden["full_body/kps_lhand"], golden["full_body/kps_rhand"]
    assert np.isnan(right[2]).all() and not np.isnan(left[2]).any()  # input left hand unseen
    assert np.isnan(left[4, 0]).all() and np.isnan(left[4]).sum() == 6  # right root + 2 fingers


def test_retarget_leaves_inputs_alone():
    template_first, reference, template, template_edit, reference_edit = edit_scenario_inputs("edit_upper_body")
    before = copy.deepcopy((template_first, reference, template, template_edit, reference_edit))
    retarget_poses(template_first, reference, template)
    retarget_poses(template_first, reference, template, template_edit, reference_edit)
    for got, expected in zip(
        [template_first, reference, *template, template_edit, reference_edit],
        [before[0], before[1], *before[2], before[3], before[4]],
    ):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value)
            assert type(got[key]) is type(value)
