"""Person detection and whole-body 2D pose: the official preprocessor's ``Pose2d``.

A YOLO detector (ONNX) finds the largest person in each frame; a ViTPose whole-body model
(ONNX) turns a crop around that person into 133 COCO-WholeBody heatmaps, decoded with DARK
(Zhang et al., "Distribution-Aware Coordinate Representation for Human Pose Estimation",
CVPR 2020). Every step keeps the official arithmetic (dtypes, operation order, rounding):
the crop is cut at whole pixels and the detector boxes are truncated to integers, so a
last-bit difference could move a box or a crop by a pixel.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from wanrt.animate_prep.pose_meta import pose_metas_from_keypoints
from wanrt.errors import CheckpointError

DETECTOR_INPUT_SIZE = 640
# Detections below this confidence are dropped, both before NMS and when choosing the person.
DETECTION_MIN_SCORE = 0.05
NMS_IOU_THRESHOLD = 0.5
# Category ids count from 1 as in COCO's annotations; the detector's classes count from 0.
PERSON_CATEGORY_ID = 1
# A person box whose longer side is under this fraction of the reference side is skipped
# (a small, far-away person must not win over the main subject).
MIN_SIDE_RATIO = 0.4
# Smaller boxes are treated as failed detections: the pose model then sees the whole image.
MIN_BOX_SIDE = 10

POSE_INPUT_HEIGHT, POSE_INPUT_WIDTH = 256, 192
POSE_ASPECT = POSE_INPUT_HEIGHT / float(POSE_INPUT_WIDTH)
# The crop is this much larger than the person box, for context around the limbs.
CROP_PADDING = 1.25
# Box sizes are carried in units of 200 pixels, the convention of the mmpose/SPIN code the
# official helpers come from; the divisions and products are kept so that the crop rounds the same.
PIXEL_STD = 200.0
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
# DARK's Gaussian modulation kernel: 11 matches the sigma=2 heatmaps ViTPose is trained on.
DARK_KERNEL = 11


def detector_input(frame: np.ndarray) -> np.ndarray:
    """[1, 3, 640, 640] float32 in [0, 1] from an RGB uint8 frame (a plain stretch, no letterbox)."""
    resized = cv2.resize(frame, (DETECTOR_INPUT_SIZE, DETECTOR_INPUT_SIZE))
    # Divided in float64 and cast afterwards, as the official preprocessing does.
    return (resized / 255.0).transpose(2, 0, 1).astype(np.float32)[None]


def detections_from_output(output: np.ndarray, width: int, height: int) -> np.ndarray:
    """[M, 6] rows (x1, y1, x2, y2, score, class) in frame pixels after NMS, best first.

    ``output`` is the detector's output for one image: [N, 6] rows (x1, y1, x2, y2, score,
    class) from an end-to-end model (YOLOv10, the official choice), or [84, N] (centre x,
    centre y, width, height, then 80 class scores) from a YOLOv8-style head.
    """
    # Float64 factors, as the official ones (from an integer shape array) are: the float32
    # coordinates are then scaled in float64 and rounded once.
    factors = np.array([width, height]) / DETECTOR_INPUT_SIZE
    if output.ndim == 2 and output.shape[1] == 6:
        kept = output[output[:, 4] >= DETECTION_MIN_SCORE]
        scores, classes = kept[:, 4], kept[:, 5]
        corners = (kept[:, :4] * np.tile(factors, 2)).astype(np.float32)
        boxes = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
    elif output.ndim == 2 and output.shape[0] == 84:
        # The official code means to transpose here too, but tests the anchor axis against
        # 84, so it reads a [84, N] output correctly only when N is 84. wanrt always does.
        rows = output.T
        class_scores = rows[:, 4:]
        kept_mask = class_scores.max(axis=1) >= DETECTION_MIN_SCORE
        kept = rows[kept_mask]
        scores, classes = class_scores[kept_mask].max(axis=1), class_scores[kept_mask].argmax(axis=1)
        centers, sizes = kept[:, :2], kept[:, 2:4]
        boxes = np.concatenate([(centers - sizes / 2) * factors, sizes * factors], axis=1)
    else:
        raise CheckpointError(f"the person detector's output has shape {list(output.shape)}; expected "
                              "[N, 6] (YOLOv10 end-to-end) or [84, N] (YOLOv8) per image")
    if len(kept) == 0:
        return np.zeros((0, 6))
    # Truncated to whole pixels as x, y, width, height; the corners are rebuilt from those.
    boxes = boxes.astype(np.int32)
    keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), DETECTION_MIN_SCORE, NMS_IOU_THRESHOLD)
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    x, y, w, h = boxes[keep].T.astype(np.int64)
    return np.stack([x, y, x + w, y + h, scores[keep], classes[keep]], axis=1).astype(np.float64)


def select_person(detections: np.ndarray, width: int, height: int) -> np.ndarray:
    """(x1, y1, x2, y2, score) of the one person to track, or the whole frame with score -1.

    The largest person box by area wins, except that a box whose longer side is under
    ``MIN_SIDE_RATIO`` of the reference side is passed over; the reference starts as the
    longest person side and becomes each newly chosen box's own, so the scan order (NMS
    order, best score first) matters, as it does in the official loop.
    """
    persons = detections[(detections[:, 5] + 1 == PERSON_CATEGORY_ID)
                         & (detections[:, 4] > DETECTION_MIN_SCORE)]
    widths, heights = persons[:, 2] - persons[:, 0], persons[:, 3] - persons[:, 1]
    sides = np.maximum(widths, heights)
    reference_side = sides.max() if len(persons) else -1
    chosen, chosen_area = None, -10 * width * height
    for index, (area, side) in enumerate(zip(widths * heights, sides)):
        if area > chosen_area and side >= reference_side * MIN_SIDE_RATIO:
            chosen, chosen_area, reference_side = index, area, side
    if chosen is None:
        return np.array([0.0, 0.0, float(width), float(height), -1.0])
    return persons[chosen, :5]


def crop_box(bbox: np.ndarray | None, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre (pixels) and (width, height) in units of ``PIXEL_STD`` of the pose model's crop.

    The crop has the model's 3:4 aspect and encloses the box padded by ``CROP_PADDING``; a
    missing, unscored or tiny box gives the whole frame.
    """
    if (bbox is None or bbox[4] <= 0 or bbox[2] - bbox[0] < MIN_BOX_SIDE
            or bbox[3] - bbox[1] < MIN_BOX_SIDE):
        bbox = np.array([0, 0, width, height])
    x1, y1, x2, y2 = bbox[:4]
    center = np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])
    crop_height = max((x2 - x1) * POSE_ASPECT, y2 - y1)
    scale = np.array([crop_height / POSE_ASPECT, crop_height]) / PIXEL_STD
    scale *= CROP_PADDING
    return center, scale


def crop_corners(center: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (inclusive) and bottom-right (exclusive) integer pixel corners of the crop."""
    crop_height = PIXEL_STD * scale.max()
    crop_width = crop_height / POSE_ASPECT
    frame_to_crop = np.zeros((3, 3))
    frame_to_crop[0, 0] = POSE_INPUT_WIDTH / crop_width
    frame_to_crop[1, 1] = POSE_INPUT_HEIGHT / crop_height
    frame_to_crop[0, 2] = POSE_INPUT_WIDTH * (-float(center[0]) / crop_width + 0.5)
    frame_to_crop[1, 2] = POSE_INPUT_HEIGHT * (-float(center[1]) / crop_height + 0.5)
    frame_to_crop[2, 2] = 1
    # The inverse matrix (not the closed form) and np.dot keep the official rounding of the
    # corners, which may fall on half pixels; they are rounded half to even.
    crop_to_frame = np.linalg.inv(frame_to_crop)
    top_left = np.rint(np.dot(crop_to_frame, np.array([0.0, 0.0, 1.0]))[:2]).astype(np.int64)
    bottom_right = np.rint(np.dot(crop_to_frame, np.array(
        [float(POSE_INPUT_WIDTH), float(POSE_INPUT_HEIGHT), 1.0]))[:2]).astype(np.int64)
    return top_left, bottom_right


def pose_input(image: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[1, 3, 256, 192] float32 ImageNet-normalized crop of a uint8 HxWx3 image.

    The crop is cut at whole pixels (zeros outside the image) and resized bilinearly.
    """
    top_left, bottom_right = crop_corners(center, scale)
    crop_w, crop_h = bottom_right - top_left
    cut = np.zeros((crop_h, crop_w, 3), dtype=np.float32)
    x0, y0 = np.maximum(top_left, 0)
    x1, y1 = np.minimum(bottom_right, (image.shape[1], image.shape[0]))
    if x1 > x0 and y1 > y0:
        cut[y0 - top_left[1]:y1 - top_left[1], x0 - top_left[0]:x1 - top_left[0]] = image[y0:y1, x0:x1]
    crop = cv2.resize(cut, (POSE_INPUT_WIDTH, POSE_INPUT_HEIGHT))
    return ((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)[None]


def dark_refine(log_heatmap: np.ndarray, x: int, y: int) -> np.ndarray:
    """Sub-pixel offset of the peak near integer (x, y) from a second-order Taylor expansion.

    Zero where the 5x5 neighbourhood leaves the map or the Hessian is singular. The float32
    arithmetic and the explicit inverse follow the official decoder.
    """
    h = log_heatmap
    height, width = h.shape
    if not (1 < x < width - 2 and 1 < y < height - 2):
        return np.zeros(2)
    dx = 0.5 * (h[y, x + 1] - h[y, x - 1])
    dy = 0.5 * (h[y + 1, x] - h[y - 1, x])
    dxx = 0.25 * (h[y, x + 2] - 2 * h[y, x] + h[y, x - 2])
    dxy = 0.25 * (h[y + 1, x + 1] - h[y - 1, x + 1] - h[y + 1, x - 1] + h[y - 1, x - 1])
    dyy = 0.25 * (h[y + 2, x] - 2 * h[y, x] + h[y - 2, x])
    if dxx * dyy - dxy ** 2 == 0:
        return np.zeros(2)
    hessian = np.array([[dxx, dxy], [dxy, dyy]])
    return (-np.linalg.inv(hessian) @ np.array([[dx], [dy]]))[:, 0]


def modulate(heatmap: np.ndarray) -> np.ndarray:
    """DARK's Gaussian modulation: blurred with zero padding, rescaled to the original peak."""
    border = (DARK_KERNEL - 1) // 2
    padded = np.zeros((heatmap.shape[0] + 2 * border, heatmap.shape[1] + 2 * border), dtype=np.float32)
    padded[border:-border, border:-border] = heatmap
    blurred = cv2.GaussianBlur(padded, (DARK_KERNEL, DARK_KERNEL), 0)[border:-border, border:-border]
    blurred *= heatmap.max() / blurred.max()
    return blurred


def keypoints_from_heatmaps(heatmaps: np.ndarray, center: np.ndarray, box_size: np.ndarray) -> np.ndarray:
    """[K, 3] (x, y, confidence) in frame pixels from one person's [K, H, W] heatmaps.

    ``box_size`` is the crop's (width, height) in pixels. The peak of each map is refined by
    DARK; a map with no positive value gives the point (-1, -1) before the crop transform.
    """
    num_points, map_h, map_w = heatmaps.shape
    flat = heatmaps.reshape(num_points, -1)
    peaks = flat.argmax(axis=1)
    confidences = flat.max(axis=1)
    points = np.stack([peaks % map_w, peaks // map_w], axis=1).astype(np.float32)
    points[~(confidences > 0)] = -1
    for k in range(num_points):
        log_heatmap = np.log(np.maximum(modulate(heatmaps[k]), 1e-10))
        points[k] += dark_refine(log_heatmap, int(points[k, 0]), int(points[k, 1]))
    # Heatmap cells to frame pixels: the map spans the crop, its cell 0 at the crop's left edge.
    frame_points = np.empty_like(points)
    frame_points[:, 0] = points[:, 0] * (box_size[0] / map_w) + center[0] - box_size[0] * 0.5
    frame_points[:, 1] = points[:, 1] * (box_size[1] / map_h) + center[1] - box_size[1] * 0.5
    return np.concatenate([frame_points, confidences[:, None]], axis=1)


class PoseEstimator:
    """The official ``Pose2d`` on a list of frames: one person per frame, 133 keypoints."""

    def __init__(self, pose_model: Path, detector: Path, providers: list[str] | None = None):
        import onnxruntime

        # As the official code: CUDA when this onnxruntime has it, else the CPU.
        providers = providers or [provider for provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                  if provider in onnxruntime.get_available_providers()]
        self.pose_session = onnxruntime.InferenceSession(str(pose_model), providers=providers)
        self.detector_session = onnxruntime.InferenceSession(str(detector), providers=providers)
        check_input_size(self.pose_session, (POSE_INPUT_HEIGHT, POSE_INPUT_WIDTH), pose_model)
        check_input_size(self.detector_session, (DETECTOR_INPUT_SIZE, DETECTOR_INPUT_SIZE), detector)

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """(x1, y1, x2, y2, score) of the person in an RGB frame; the whole frame with score -1 if none."""
        height, width = frame.shape[:2]
        output = run(self.detector_session, detector_input(frame))[0]
        return select_person(detections_from_output(output, width, height), width, height)

    def estimate(self, image: np.ndarray, bbox: np.ndarray) -> np.ndarray:
        """[133, 3] keypoints (x, y, confidence) in pixels of the person in ``bbox``."""
        center, scale = crop_box(bbox, image.shape[1], image.shape[0])
        heatmaps = run(self.pose_session, pose_input(image, center, scale))[0]
        return keypoints_from_heatmaps(heatmaps, center, scale * PIXEL_STD)

    def __call__(self, frames: list[np.ndarray]) -> list[dict]:
        """Normalized pose dicts (``pose_metas_from_keypoints``) of RGB uint8 HxWx3 frames."""
        height, width = frames[0].shape[:2]
        keypoints = []
        for frame in frames:
            # Parity with the official preprocessor, whose reference poses were made this way:
            # its loader applies BGR->RGB to frames that are already RGB, so the pose model
            # sees them channel-swapped, while the detector's reader swaps them back to RGB.
            keypoints.append(self.estimate(frame[..., ::-1], self.detect(frame)))
        return pose_metas_from_keypoints(np.stack(keypoints), width=width, height=height)


def run(session, model_input: np.ndarray) -> np.ndarray:
    """The first output of a one-input onnxruntime session."""
    return session.run(None, {session.get_inputs()[0].name: model_input})[0]


def check_input_size(session, size: tuple[int, int], path: Path) -> None:
    """Refuses a model whose fixed input height and width differ from the official pipeline's."""
    model_size = tuple(session.get_inputs()[0].shape[2:])
    if all(isinstance(dim, int) for dim in model_size) and model_size != size:
        raise CheckpointError(f"{path} takes {model_size[0]}x{model_size[1]} inputs; the Animate "
                              f"preprocessing feeds it {size[0]}x{size[1]}: use the official model")
