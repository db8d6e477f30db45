"""Person detection and whole-body pose (`wanrt.animate_prep.pose2d`) against the official `Pose2d`.

The ONNX models are tiny deterministic stand-ins built here with `onnx.helper`, in the
official input/output shapes: detector [1,3,640,640] -> [1,N,6] (YOLOv10) or [1,84,N]
(YOLOv8), pose model [1,3,256,192] -> [1,133,64,48] heatmaps. Their outputs depend on the
image's colours, so a channel swap, a shifted box or a shifted crop changes the result.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper

from wanrt.animate_prep.pose2d import (
    PoseEstimator,
    crop_box,
    detections_from_output,
    keypoints_from_heatmaps,
    select_person,
)
from wanrt.errors import CheckpointError

GOLDEN = FIXTURES / "animate_prep/pose2d_official.npz"
NUM_KEYPOINTS, HEATMAP_H, HEATMAP_W = 133, 64, 48


def serialized(nodes, inputs, outputs, initializers) -> bytes:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wanrt-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def colour_linear_model(weights: np.ndarray, bias: np.ndarray, output_shape: list[int], size: int = 640) -> bytes:
    """[1,3,size,size] -> output_shape: bias + the image's mean colour (R, G, B) @ weights."""
    return serialized(
        [helper.make_node("GlobalAveragePool", ["images"], ["mean"]),
         helper.make_node("Reshape", ["mean", "flat_shape"], ["colour"]),
         helper.make_node("MatMul", ["colour", "weights"], ["mixed"]),
         helper.make_node("Add", ["mixed", "bias"], ["flat"]),
         helper.make_node("Reshape", ["flat", "output_shape"], ["output0"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.array([1, 3], np.int64), "flat_shape"),
         numpy_helper.from_array(weights.astype(np.float32), "weights"),
         numpy_helper.from_array(bias.reshape(-1).astype(np.float32), "bias"),
         numpy_helper.from_array(np.array(output_shape, np.int64), "output_shape")])


# End-to-end rows (x1, y1, x2, y2, score, class) in 640x640 detector pixels. Row 1 has the best
# score but is too small beside row 0; row 2 overlaps row 0 (NMS drops it); row 3 is not a
# person; row 4 is under the score threshold; row 5 is a smaller second person.
END_TO_END_ROWS = np.array([
    [150, 100, 420, 600, 0.85, 0],
    [470, 300, 520, 380, 0.90, 0],
    [160, 110, 430, 590, 0.60, 0],
    [0, 0, 640, 640, 0.95, 2],
    [10, 10, 600, 630, 0.03, 0],
    [300, 150, 560, 560, 0.50, 0],
    [40, 200, 250, 620, 0.45, 0],
    [500, 20, 630, 90, 0.30, 16],
])


def colour_weights(rows: np.ndarray, rng: np.random.Generator, score_columns) -> tuple[np.ndarray, np.ndarray]:
    """Weights [3, rows*cols] and bias (``rows``) moving the boxes (columns 0-3) by up to ~30 px
    with the colour; every score falls by 1 as the green mean goes from 0.5 to 0 (a dark-green
    frame has nobody in it). Class columns do not move."""
    weights = np.zeros((3,) + rows.shape)
    bias = rows.astype(np.float64).copy()
    weights[:, :, :4] = rng.uniform(-30, 30, (3, rows.shape[0], 4))
    weights[1][:, score_columns] = 2.0
    weights[0][:, score_columns] = rng.uniform(-0.05, 0.05, (rows.shape[0], len(score_columns)))
    bias[:, score_columns] -= 1.0
    return weights.reshape(3, -1), bias


def end_to_end_detector(size: int = 640) -> bytes:
    rng = np.random.default_rng(1)
    weights, bias = colour_weights(END_TO_END_ROWS, rng, [4])
    return colour_linear_model(weights, bias, [1, len(END_TO_END_ROWS), 6], size)


def yolov8_detector() -> bytes:
    """[1, 84, 84]: 84 anchors (so the official code, which transposes only then, reads it right)."""
    rng = np.random.default_rng(2)
    anchors = np.zeros((84, 84))
    anchors[:, :4] = [320, 320, 50, 50]
    anchors[:, 4:] = 0.01
    # (centre x, centre y, width, height, class, score)
    for anchor, (cx, cy, w, h, cls, score) in enumerate([
            (300, 330, 280, 560, 0, 0.80), (310, 320, 300, 540, 0, 0.70), (520, 200, 60, 120, 0, 0.92),
            (320, 320, 640, 640, 56, 0.97), (120, 400, 200, 420, 0, 0.55)], start=7):
        anchors[anchor, :4] = [cx, cy, w, h]
        anchors[anchor, 4 + cls] = score
    weights, bias = colour_weights(anchors, rng, list(range(4, 84)))
    # Only the chosen anchors' scores move with the colour; the rest stay below the threshold.
    weights = weights.reshape(3, 84, 84)
    bias = bias.copy()
    idle = np.ones(84, bool)
    idle[7:12] = False
    weights[:, idle, 4:] = 0
    bias[idle, 4:] = 0.01
    return colour_linear_model(weights.transpose(0, 2, 1).reshape(3, -1), bias.T, [1, 84, 84])


def pose_model() -> bytes:
    """Fixed sigma-2 Gaussian heatmaps plus a 1x1 convolution of the 4x4-pooled crop (~0.02).

    Peaks sit at sub-pixel places inside the map, except point 3 on the left border (no DARK
    step there) and point 7, negative everywhere (decoded as "not found").
    """
    rng = np.random.default_rng(3)
    ys, xs = np.mgrid[0:HEATMAP_H, 0:HEATMAP_W]
    centres = np.stack([rng.uniform(4, HEATMAP_W - 5, NUM_KEYPOINTS), rng.uniform(4, HEATMAP_H - 5, NUM_KEYPOINTS)], 1)
    centres[3] = [0.3, 30.4]
    amplitudes = rng.uniform(0.3, 0.9, NUM_KEYPOINTS)
    base = amplitudes[:, None, None] * np.exp(
        -((xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2) / (2 * 2.0 ** 2))
    base[7] = -0.5
    conv = rng.normal(0, 0.01, (NUM_KEYPOINTS, 3, 1, 1))
    return serialized(
        [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
         helper.make_node("Conv", ["pooled", "conv"], ["texture"]),
         helper.make_node("Add", ["texture", "base"], ["heatmaps"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 256, 192])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, [1, NUM_KEYPOINTS, HEATMAP_H, HEATMAP_W])],
        [numpy_helper.from_array(conv.astype(np.float32), "conv"),
         numpy_helper.from_array(base[None].astype(np.float32), "base")])


def frames(seed: int, count: int, height: int, width: int, tints) -> list[np.ndarray]:
    """Textured RGB uint8 frames, each with its own colour tint (R, G, B offsets)."""
    rng = np.random.default_rng(seed)
    result = []
    for tint in tints[:count]:
        noise = rng.integers(0, 96, (height, width, 3))
        result.append(np.clip(noise + np.array(tint), 0, 255).astype(np.uint8))
    return result


# Each case: detector, frames. The third end-to-end frame is dark green: nobody is detected.
CASES = {
    "end_to_end": (end_to_end_detector, lambda: frames(10, 3, 120, 160, [(90, 80, 40), (150, 60, 10), (60, -80, 90)])),
    "yolov8": (yolov8_detector, lambda: frames(11, 2, 131, 97, [(40, 100, 70), (120, 70, 120)])),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


@pytest.mark.parametrize("case", CASES)
def test_pose_matches_official(case, golden, tmp_path):
    build_detector, make_frames = CASES[case]
    detector, pose, images = build_detector(), pose_model(), make_frames()
    # The golden file was made with byte-identical models and frames.
    assert sha256(detector) == str(golden[f"{case}/detector_sha256"])
    assert sha256(pose) == str(golden["pose_sha256"])
    assert sha256(np.stack(images).tobytes()) == str(golden[f"{case}/frames_sha256"])
    (tmp_path / "det.onnx").write_bytes(detector)
    (tmp_path / "pose.onnx").write_bytes(pose)
    estimator = PoseEstimator(tmp_path / "pose.onnx", tmp_path / "det.onnx", ["CPUExecutionProvider"])

    boxes = np.stack([estimator.detect(image) for image in images])
    np.testing.assert_array_equal(boxes, golden[f"{case}/bboxes"])
    keypoints = np.stack([estimator.estimate(image[..., ::-1], box) for image, box in zip(images, boxes)])
    np.testing.assert_allclose(keypoints, golden[f"{case}/keypoints"], rtol=0, atol=1e-5)

    metas = estimator(images)
    for key in ("keypoints_body", "keypoints_left_hand", "keypoints_right_hand", "keypoints_face"):
        np.testing.assert_allclose(np.stack([meta[key] for meta in metas]), golden[f"{case}/{key}"],
                                   rtol=0, atol=1e-5, err_msg=key)
    assert all((meta["width"], meta["height"]) == images[0].shape[1::-1] for meta in metas)


def test_golden_cases_exercise_selection_and_fallback(golden):
    """The fixtures cover a chosen person, the smaller-but-better-scored box passed over, the
    nobody-found full frame, and heatmaps with and without a DARK step."""
    boxes = golden["end_to_end/bboxes"]
    assert (boxes[:2, 4] > 0.5).all() and (boxes[:2, 2] - boxes[:2, 0] > 60).all()
    np.testing.assert_array_equal(boxes[2], [0, 0, 160, 120, -1])
    assert (golden["yolov8/bboxes"][:, 4] > 0).all()
    fractions = golden["end_to_end/keypoints"][..., :2] % 1
    assert (fractions != 0).mean() > 0.9


def gaussian_map(x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    ys, xs = np.mgrid[0:HEATMAP_H, 0:HEATMAP_W]
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def test_heatmap_decoder_recovers_subpixel_peak():
    peaks = [(20.3, 31.7), (10.8, 50.25), (37.45, 8.6)]
    heatmaps = np.stack([gaussian_map(x, y) for x, y in peaks]
                        + [gaussian_map(0.2, 20.0), np.full((HEATMAP_H, HEATMAP_W), -1, np.float32)])
    center, box_size = np.array([300.0, 200.0]), np.array([96.0, 128.0])
    keypoints = keypoints_from_heatmaps(heatmaps, center, box_size)
    # Back to heatmap cells: the map's cell 0 is at the crop's top-left corner.
    cells = (keypoints[:, :2] - (center - box_size / 2)) * [HEATMAP_W, HEATMAP_H] / box_size
    np.testing.assert_allclose(cells[:3], peaks, atol=0.05)
    np.testing.assert_allclose(keypoints[:3, 2], [gaussian_map(x, y).max() for x, y in peaks])
    np.testing.assert_allclose(cells[3], [0, 20])  # on the border: the integer peak, unrefined
    np.testing.assert_allclose(cells[4], [-1, -1])  # nothing positive: "not found"
    assert keypoints[4, 2] == -1


def test_person_selection():
    width, height = 200, 100
    rows = np.array([
        [10, 10, 30, 40, 0.99, 0],     # small person, best score
        [50, 5, 150, 95, 0.80, 0],     # the largest person
        [0, 0, 200, 100, 0.95, 2],     # larger, but not a person
        [0, 0, 190, 100, 0.04, 0],     # larger, under the score threshold
    ], dtype=np.float64)
    np.testing.assert_array_equal(select_person(rows, width, height), rows[1, :5])
    # The small person alone is chosen; with no person the whole frame comes back, scored -1.
    np.testing.assert_array_equal(select_person(rows[[0, 2]], width, height), rows[0, :5])
    np.testing.assert_array_equal(select_person(rows[2:], width, height), [0, 0, 200, 100, -1])
    np.testing.assert_array_equal(select_person(np.zeros((0, 6)), width, height), [0, 0, 200, 100, -1])


def test_person_selection_follows_scan_order():
    """Each chosen box's longer side becomes the reference for the next, as in the official
    loop: thin A, then squarer C, then D (side 35 >= 0.4 * 50) wins; in the reverse order
    D is passed over (35 < 0.4 * 100) and C wins."""
    thin_a, c, d = [0, 0, 100, 2, 0.9, 0], [0, 0, 50, 5, 0.8, 0], [0, 0, 35, 35, 0.7, 0]
    np.testing.assert_array_equal(select_person(np.array([thin_a, c, d], float), 200, 100), d[:5])
    np.testing.assert_array_equal(select_person(np.array([d, c, thin_a], float), 200, 100), c[:5])


def test_detections_are_scaled_truncated_and_suppressed():
    output = np.array([
        [100.7, 64.2, 300.9, 600.0, 0.9, 0],
        [110.0, 70.0, 300.0, 590.0, 0.8, 0],   # overlaps the first: suppressed
        [400.0, 10.0, 500.0, 100.0, 0.7, 3],
        [0.0, 0.0, 640.0, 640.0, 0.01, 0],     # under the score threshold
    ], dtype=np.float32)
    detections = detections_from_output(output, width=320, height=160)
    # x, y, width and height are truncated separately, as the official code does.
    np.testing.assert_array_equal(detections[:, :4], [[50, 16, 150, 149], [200, 2, 250, 24]])
    np.testing.assert_allclose(detections[:, 4:], [[0.9, 0], [0.7, 3]], rtol=1e-6)
    # Scaled in float64 and rounded once to float32, as the official code does: 395.87628 * 97 / 640
    # lands on 60.0 (a float32 product would give 59.999996, truncated to 59).
    row = np.array([[395.87628, 100, 413.63953, 300, 0.9, 0]], np.float32)
    np.testing.assert_array_equal(detections_from_output(row, width=97, height=200)[0, :4], [60, 31, 62, 93])
    assert detections_from_output(output[3:], 320, 160).shape == (0, 6)
    with pytest.raises(CheckpointError, match="output has shape"):
        detections_from_output(np.zeros((5, 7), np.float32), 320, 160)


def test_failed_detection_crops_whole_frame():
    full = crop_box(np.array([0, 0, 160, 120, -1.0]), 160, 120)
    for bbox in (None, np.array([10, 10, 19, 80, 0.9]), np.array([10, 10, 80, 15, 0.9])):
        for got, expected in zip(crop_box(bbox, 160, 120), full):
            np.testing.assert_array_equal(got, expected)
    center, scale = full
    np.testing.assert_array_equal(center, [80, 60])
    # 3:4 crop around 160x120 padded by 1.25, in units of 200 px.
    np.testing.assert_allclose(scale * 200, [200, 200 * 4 / 3])


def test_model_with_other_input_size_is_refused(tmp_path):
    (tmp_path / "det.onnx").write_bytes(end_to_end_detector(size=320))
    (tmp_path / "pose.onnx").write_bytes(pose_model())
    with pytest.raises(CheckpointError, match="320x320"):
        PoseEstimator(tmp_path / "pose.onnx", tmp_path / "det.onnx", ["CPUExecutionProvider"])
