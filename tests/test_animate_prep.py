"""`wanrt animate-prep` end to end: tiny random ONNX pose models in the official checkpoint
layout (built by tests/test_animate_prep_pose2d.py), a tiny random SAM2, a toy template video
and reference image; the folder written is the one `wanrt generate --task animate-14B` reads."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from test_animate_prep_pose2d import end_to_end_detector, frames, pose_model
from typer.testing import CliRunner

from wanrt.animate_prep import prepare as prep
from wanrt.animate_prep.faces import face_crop
from wanrt.animate_prep.frames import area_size, read_template
from wanrt.animate_prep.pose2d import PoseEstimator
from wanrt.cli.app import app
from wanrt.pipelines.animate import read_source
from wanrt.video_io import OutputWriteError, read_video_uint8, write_video_uint8

runner = CliRunner()
AREA = (64, 48)


def write_checkpoint(root):
    """The official process_checkpoint layout with tiny random pose models."""
    for relative, model in ((prep.DETECTOR, end_to_end_detector()), (prep.POSE_MODEL, pose_model())):
        (root / relative).parent.mkdir(parents=True)
        (root / relative).write_bytes(model)
    return root


def write_inputs(root):
    """A checkpoint folder, a 5-frame 25 fps template of 120x160 and a 90x70 reference PNG."""
    return write_checkpoint(root / "process_checkpoint"), write_template(root)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("process_checkpoint"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_template(tmp_path_factory.mktemp("inputs"))


def write_template(root):
    video = root / "template.mp4"
    write_video_uint8(np.stack(frames(10, 5, 120, 160, [(90, 80, 40), (150, 60, 10), (80, 70, 60),
                                                         (100, 50, 30), (70, 90, 50)])), video, 25)
    reference = root / "reference.png"
    cv2.imwrite(str(reference), frames(4, 1, 90, 70, [(30, 120, 60)])[0][..., ::-1])
    return video, reference


def pose_models(ckpt):
    return prep.PrepModels(PoseEstimator(ckpt / prep.POSE_MODEL, ckpt / prep.DETECTOR, ["CPUExecutionProvider"]))


def wanrt(*args):
    return runner.invoke(app, ["animate-prep", *map(str, args)])


def test_cli_animation_writes_the_official_folder(ckpt, inputs, tmp_path):
    video, reference = inputs
    save = tmp_path / "process_results"
    result = wanrt("--ckpt_path", ckpt, "--video_path", video, "--refer_path", reference, "--save_path", save,
                   "--resolution_area", *AREA, "--fps", 30, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in save.iterdir()) == ["animate_prep.json", "src_face.mp4", "src_pose.mp4",
                                                      "src_ref.png"]
    assert (save / "src_ref.png").read_bytes() == reference.read_bytes()  # copied as the official code does
    source = read_source(save, replace=False)
    height, width = area_size(90, 70, AREA[0] * AREA[1])  # the pose video has the resized reference's size
    assert source.pose.shape == (6, height, width, 3) and source.face.shape == (6, 512, 512, 3)
    assert source.pose.float().mean() > 1  # skeletons were drawn
    # Face crops are the template's frames at 30 fps (official indices), cropped at each pose's face.
    template, _ = read_template(video, 30)
    poses = PoseEstimator(ckpt / prep.POSE_MODEL, ckpt / prep.DETECTOR, ["CPUExecutionProvider"])(template)
    expected = np.stack([face_crop(frame, pose["keypoints_face"]) for frame, pose in zip(template, poses)])
    assert np.abs(source.face.numpy().astype(int) - expected).mean() < 3  # H.264 at crf 18
    record = json.loads((save / "animate_prep.json").read_text())
    assert record["frames"] == 6 and record["fps"] == 30 and record["options"]["replace"] is False


def test_retargeted_animation_draws_at_the_reference_size(ckpt, inputs, tmp_path):
    video, reference = inputs
    record = prep.prepare(video, reference, tmp_path / "out", lambda: pose_models(ckpt),
                          prep.PrepOptions(resolution_area=AREA, fps=-1, retarget=True))
    assert record["frames"] == 5 and record["fps"] == 25
    pose, rate = read_video_uint8(tmp_path / "out" / "src_pose.mp4")
    assert rate == 25 and pose.shape[1:3] == area_size(90, 70, AREA[0] * AREA[1]) and pose.float().mean() > 1


def test_replacement_writes_background_and_mask(ckpt, inputs, tmp_path):
    from test_animate_prep_frames import tiny_sam2

    video, reference = inputs
    save = tmp_path / "out"
    (save).mkdir()
    (save / "src_bg.mp4").write_bytes(b"from an earlier run")
    models = prep.PrepModels(pose_models(ckpt).pose, sam2=tiny_sam2())
    record = prep.prepare(video, reference, save, lambda: models,
                          prep.PrepOptions(resolution_area=AREA, replace=True, iterations=1, kernel_size=3))
    source = read_source(save, replace=True)
    height, width = area_size(120, 160, AREA[0] * AREA[1])
    assert record["pose_size"] == {"height": height, "width": width}
    assert source.bg.shape == source.pose.shape == (6, height, width, 3) and source.mask.shape == (6, height, width)
    assert 0 < source.mask.mean() < 1
    # The background is black where the mask hides the person (up to the codec's blur at edges).
    hidden = source.mask > 0.9
    assert source.bg[hidden].float().mean() < 20 < source.bg[source.mask < 0.1].float().mean()


@pytest.mark.parametrize("args,needle", [
    (["--use_flux", "--retarget_flag"], "lacks FLUX.1-Kontext-dev"),
    (["--use_flux"], "add --retarget_flag"),
    (["--retarget_flag", "--replace_flag"], "for animation only"),
    (["--replace_flag"], "lacks sam2/sam2_hiera_large.pt"),
    (["--fps", "0"], "--fps 0 must be positive"),
    (["--resolution_area", "8", "8"], "too small"),
    (["--k", "0"], "--k 0 must be at least 1"),
    (["--video_path", "{missing}"], "--video_path"),
    (["--refer_path", "{broken}"], "--refer_path"),
    (["--save_path", "{file}"], "is a file"),
    (["--ckpt_path", "{missing}"], "--ckpt_path"),
], ids=["flux-folder", "flux-without-retarget", "retarget-replace", "sam2-file", "fps", "area", "k", "video",
        "reference", "save-file", "ckpt"])
def test_bad_inputs_are_one_line_and_write_nothing(ckpt, inputs, tmp_path, args, needle):
    video, reference = inputs
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    (tmp_path / "file").write_text("")
    values = {"{missing}": tmp_path / "missing", "{broken}": broken, "{file}": tmp_path / "file"}
    args = [str(values.get(arg, arg)) for arg in args]
    base = {"--ckpt_path": ckpt, "--video_path": video, "--refer_path": reference, "--save_path": tmp_path / "out"}
    flags = [item for flag, value in base.items() if flag not in args for item in (flag, value)]
    result = wanrt(*flags, *args, "--device", "cpu")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failure_leaves_the_destination_as_it_was(ckpt, inputs, tmp_path, monkeypatch):
    video, reference = inputs
    save = tmp_path / "out"
    save.mkdir()
    (save / "src_pose.mp4").write_bytes(b"an earlier run")
    writes = []

    def failing_write(pixels, path, fps):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        return write_video_uint8(pixels, path, fps)

    monkeypatch.setattr(prep, "write_video_uint8", failing_write)
    with pytest.raises(OutputWriteError, match="nothing was changed there"):
        prep.prepare(video, reference, save, lambda: pose_models(ckpt), prep.PrepOptions(resolution_area=AREA))
    assert [p.name for p in save.iterdir()] == ["src_pose.mp4"] and (save / "src_pose.mp4").read_bytes() == b"an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
