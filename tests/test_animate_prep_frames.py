"""Animate preprocessing: template frame selection, area resizes and replacement masks, against
outputs of the official preprocessor's functions (tests/fixtures/animate_prep/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")

from wanrt.animate_prep import frames, masks  # noqa: E402
from wanrt.errors import InputError  # noqa: E402
from wanrt.video_io import read_video_uint8, write_video_uint8  # noqa: E402

GOLDEN = np.load(Path(__file__).parent / "fixtures" / "animate_prep" / "frames_golden.npz")


@pytest.mark.parametrize("case", range(4))
def test_resizes_match_the_official_functions(case):
    image = GOLDEN[f"image{case}"]
    assert np.array_equal(frames.resize_to_area(image, int(GOLDEN[f"area{case}"])), GOLDEN[f"resized{case}"])
    assert np.array_equal(frames.letterbox(image, 32, 48), GOLDEN[f"letterbox{case}"])


def test_frame_indices_match_the_official_function():
    assert frames.frame_indices(100, 25.0, 30) == GOLDEN["indices_100_25_30"].tolist()
    assert frames.frame_indices(97, 29.97, 16) == GOLDEN["indices_97_2997_16"].tolist()


def test_read_template_resamples_by_timestamp(tmp_path):
    """25 fps resampled to 30 repeats frames at the official indices; -1 keeps every frame."""
    rng = np.random.default_rng(0)
    video = tmp_path / "template.mp4"
    write_video_uint8(rng.integers(0, 256, (10, 32, 48, 3), dtype=np.uint8), video, 25)
    decoded, _ = read_video_uint8(video)
    picked, fps = frames.read_template(video, 30)
    assert fps == 30 and len(picked) == 12
    for frame, index in zip(picked, frames.frame_indices(10, 25.0, 30)):
        assert np.array_equal(frame, decoded[index].numpy())
    same, rate = frames.read_template(video, -1)
    assert rate == 25 and np.array_equal(np.stack(same), decoded.numpy())


def test_read_template_refuses_a_missing_or_broken_video(tmp_path):
    with pytest.raises(InputError, match="--video_path .* does not exist"):
        frames.read_template(tmp_path / "absent.mp4", 30)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(InputError, match="--video_path"):
        frames.read_template(broken, 30)


@pytest.mark.parametrize("iterations,kernel,columns,rows", [(3, 7, 1, 1), (1, 3, 4, 3), (2, 5, 10, 20)])
def test_replacement_mask_matches_the_official_growth(iterations, kernel, columns, rows):
    grown = masks.replacement_mask(GOLDEN["mask"].copy(), kernel, iterations, columns, rows)
    assert np.array_equal(grown, GOLDEN[f"mask_{iterations}_{kernel}_{columns}_{rows}"])


def test_replacement_mask_keeps_an_empty_mask_and_skips_growth_without_iterations():
    empty = np.zeros((16, 16), np.uint8)
    assert not masks.replacement_mask(empty).any()
    assert np.array_equal(masks.replacement_mask(GOLDEN["mask"].copy(), iterations=0), GOLDEN["mask"])


def test_key_frames_follow_the_official_rule():
    assert masks.key_frames(1) == [0]
    assert masks.key_frames(4) == [0]
    assert masks.key_frames(6) == [0, 1, 2, 3, 4, 5]
    assert masks.key_frames(9) == [0, 2, 4, 6, 8]
    assert masks.key_frames(400) == [0, 100, 200, 300]


# A tiny random SAM2 (Hiera-T config shrunk through Hydra overrides): 128-pixel input.
TINY_SAM2 = ("++model.image_size=128", "++model.image_encoder.trunk.embed_dim=16",
             "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
             "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
             "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
             "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
             "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
             "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]", "++model.num_maskmem=3")


def tiny_sam2():
    pytest.importorskip("sam2")
    torch.manual_seed(1)  # a seed whose random SAM2 finds neither nothing nor everything
    return masks.load_sam2(None, "cpu", config="configs/sam2/sam2_hiera_t.yaml", overrides=TINY_SAM2)


def test_person_masks_equal_sam2_reading_the_same_frames_from_files(tmp_path, monkeypatch):
    """The in-memory session (the official `init_state_v2`) gives sam2's own file-based
    session's masks, session by session and with the clicks at the pose's body points."""
    predictor = tiny_sam2()
    monkeypatch.setattr(masks, "FRAMES_PER_SESSION", 5)
    rng = np.random.default_rng(0)
    video = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(7)]
    poses = [{"width": 64, "height": 48, "keypoints_body": rng.uniform(0.2, 0.8, (20, 3))} for _ in video]
    clicks = []
    add_points = predictor.add_new_points_or_box
    monkeypatch.setattr(predictor, "add_new_points_or_box",
                        lambda **kwargs: clicks.append((kwargs["frame_idx"], kwargs["points"])) or add_points(**kwargs))
    ours = masks.person_masks(predictor, video, poses)
    assert len(ours) == 7 and all(mask.shape == (48, 64) and mask.dtype == np.uint8 for mask in ours)
    assert [frame for frame, _ in clicks] == [0, 1, 2, 3, 4, 0]  # sessions of 5 and 2 frames
    assert np.array_equal(clicks[5][1], (poses[5]["keypoints_body"][list(masks.CLICKED_BODY_POINTS), :2]
                                         * [[64, 48]]).astype(np.int32))
    monkeypatch.setattr(predictor, "add_new_points_or_box", add_points)

    from PIL import Image

    reference = []
    for start in (0, 5):
        folder = tmp_path / f"session{start}"
        folder.mkdir()
        for index, frame in enumerate(video[start:start + 5]):
            # Lossless PNG data under the .jpg names sam2's folder loader lists.
            Image.fromarray(frame).save(folder / f"{index}.jpg", format="PNG")
        state = predictor.init_state(video_path=str(folder))
        for frame_index in masks.key_frames(len(video[start:start + 5])):
            body = poses[start + frame_index]["keypoints_body"]
            points = (body[list(masks.CLICKED_BODY_POINTS), :2] * [[64, 48]]).astype(np.int32)
            predictor.add_new_points_or_box(inference_state=state, frame_idx=frame_index, obj_id=1, points=points,
                                            labels=np.ones(len(points), np.int32))
        tracked = {index: logits[0, 0] > 0 for index, _, logits in predictor.propagate_in_video(state)}
        reference.extend(tracked[index].numpy().astype(np.uint8) for index in sorted(tracked))
    assert all(np.array_equal(a, b) for a, b in zip(ours, reference))
    assert 0 < np.mean(ours) < 1
