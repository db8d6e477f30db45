"""S2V end to end: runtime transforms on the S2V DiT (streaming, load-time quantization),
the official output-size rule, and `wanrt generate --task tiny-s2v` writing an mp4 whose
AAC audio decodes and lasts as long as the video; bad inputs get one line and exit 2."""

from __future__ import annotations

import copy
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import FIXTURES, load_fixture
from test_s2v_audio import flac_declaring
from test_s2v_audio import write_wav as write_wav_samples
from wanrt.audio import write_wav
from wanrt.cli.app import app
from wanrt.configs import get_task
from wanrt.demo import speech_like_audio, write_tiny_checkpoint
from wanrt.export.quantize import quantize
from wanrt.loading.s2v import load_s2v_dit
from wanrt.pipelines.s2v import fit_pose_frames, fit_reference_image, s2v_output_size
from wanrt.runtime.streaming import BlockStreamer
from wanrt.video_io import write_video

CKPT = FIXTURES / "s2v" / "Wan2.2-S2V-14B-tiny"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(scope="module")
def model_and_args():
    tensors, _ = load_fixture("s2v/forward")
    args = (tensors["x"][None], tensors["t_scalar"], tensors["context"][None], tensors["ref_latents"][None],
            tensors["motion_latents_19"][None], tensors["cond_states"][None], tensors["audio_input"], (73, 19), False)
    return load_s2v_dit(CKPT), args, tensors["motion73.out"][None]


def test_streamed_s2v_dit_equals_resident(model_and_args):
    model, args, _ = model_and_args
    streamed = copy.deepcopy(model)
    streamer = BlockStreamer("cpu", depth=1)
    streamer.register("s2v", streamed, resident_blocks=1)
    with torch.no_grad():
        expected = model(*args)
        for _ in range(2):
            streamer.expect_forward("s2v")
            assert torch.equal(streamed(*args), expected)
    assert streamer.bytes_copied > 0


@pytest.mark.parametrize("scheme,budget", [("int8", 5e-3), ("fp8", 1.5e-2)])
def test_quantized_s2v_dit_within_budget(model_and_args, scheme, budget):
    model, args, official = model_and_args
    quantized = quantize(copy.deepcopy(model), scheme)
    with torch.no_grad():
        out = quantized(*args)
    error = ((out - official).norm() / official.norm()).item()
    # Measured: int8 2.6e-3, fp8 7.3e-3 (the middle block's 10 Linears quantized).
    assert budget / 20 < error <= budget
    assert quantized.quant_report.summary().startswith(f"{scheme}: 10/47 linears quantized")


def test_output_size_follows_the_official_search():
    # 1280x720 does not fit 1280*720 once padded to 768 rows: the search shrinks to 704.
    assert s2v_output_size(720, 1280, 1280 * 720) == (704, 1280)
    assert s2v_output_size(512, 512, 64 * 64) == (64, 64)
    height, width = s2v_output_size(1000, 750, 832 * 480)
    assert height % 64 == 0 and width % 64 == 0 and height * width <= 832 * 480 and height > width


def wanrt(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def s2v_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s2v")
    ckpt = write_tiny_checkpoint(folder / "ckpt", get_task("tiny-s2v"))
    image = folder / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 72, 3), dtype=np.uint8)).save(image)
    speech = write_wav(speech_like_audio(1.0), folder / "speech.wav")
    # A 32 fps pose video: read every second frame for 16 fps.
    pose = folder / "pose.mp4"
    write_video(torch.linspace(-1, 1, 20)[None, :, None, None].expand(3, 20, 64, 48).contiguous(), pose, fps=32)
    return ckpt, image, speech, pose


def test_generate_s2v_writes_video_with_the_audio(s2v_inputs, tmp_path):
    ckpt, image, speech, pose = s2v_inputs
    output = tmp_path / "talk.mp4"
    result = wanrt("generate", "--task", "tiny-s2v", "--ckpt_dir", ckpt, "--prompt", "a cat", "--image", image,
                   "--audio", speech, "--pose_video", pose, "--num_clip", 2, "--infer_frames", 4, "--sample_steps", 2,
                   "--base_seed", 3, "--save_file", output)
    assert result.exit_code == 0, result.output
    with av.open(str(output)) as container:
        video_stream, audio_stream = container.streams.video[0], container.streams.audio[0]
        video_seconds = float(video_stream.duration * video_stream.time_base)
        audio_seconds = float(audio_stream.duration * audio_stream.time_base)
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(output)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    # Clip 1 keeps 4 - 3 frames, clip 2 all 4; the 1 s speech is cut to those 5 frames.
    assert frames == 5 and video_seconds == pytest.approx(5 / 16, abs=1 / 16)
    assert audio_stream.codec_context.name == "aac" and audio_stream.sample_rate == 16000
    assert abs(audio_seconds - video_seconds) <= 1024 / 16000
    assert samples >= 5 / 16 * 16000
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["settings"]["num_clip"] == 2 and sidecar["seed"] == 3
    assert sidecar["audio"]["seconds_in_video"] == pytest.approx(5 / 16)
    assert any(name.startswith("wav2vec2-large-xlsr-53-english/") for name in sidecar["checkpoint"]["sha256"])
    assert not list(tmp_path.glob("*.latents.safetensors"))


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["text", "empty", "ten_hours"])
def test_generate_refuses_bad_audio_before_loading(s2v_inputs, tmp_path, kind):
    _, image, _, _ = s2v_inputs
    audio = tmp_path / "speech.flac"
    if kind == "text":
        audio.write_text("not audio at all\n" * 10)
    elif kind == "empty":
        audio = tmp_path / "speech.wav"
        write_wav_samples(audio, np.zeros((1, 0)), 16000)
    else:
        flac_declaring(audio, 10 * 3600 * 16000)
    output = tmp_path / "out.mp4"
    # An empty folder as checkpoint: the audio is refused before any model is needed.
    (tmp_path / "ckpt").mkdir()
    result = wanrt("generate", "--task", "tiny-s2v", "--ckpt-dir", tmp_path / "ckpt", "--prompt", "a cat",
                   "--image", image, "--audio", audio, "--output", output)
    _one_line_error(result, "--audio", str(audio))
    assert not output.exists()


def test_tts_and_speech_flags_elsewhere_are_refused(s2v_inputs, tmp_path):
    ckpt, image, speech, _ = s2v_inputs
    result = wanrt("generate", "--task", "tiny-s2v", "--ckpt-dir", ckpt, "--prompt", "a cat", "--image", image,
                   "--enable_tts", "--tts_text", "hello")
    _one_line_error(result, "--enable_tts", "CosyVoice2", "--audio")
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", ckpt, "--prompt", "a cat", "--audio", speech)
    _one_line_error(result, "--audio", "only apply to s2v")
    result = wanrt("generate", "--task", "tiny-s2v", "--ckpt-dir", ckpt, "--prompt", "a cat", "--image", image,
                   "--audio", speech, "--infer_frames", 6)
    _one_line_error(result, "--infer_frames 6")


def test_fitted_images_are_padded_where_torchvision_pads():
    # A 16:9 image for 1280x704: resized to 704x1251, center-cropped to 1280 wide, i.e.
    # padded 14 columns left and 15 right (black for the PIL ref image, 0 for pose tensors).
    image = torch.rand(3, 720, 1280) * 1.6 - 0.8
    ref = fit_reference_image(image, 704, 1280)
    pose = fit_pose_frames(image[None], 704, 1280)[0]
    assert ref.shape == pose.shape == (3, 704, 1280)
    for fitted, fill in ((ref, -1.0), (pose, 0.0)):
        assert (fitted[:, :, :14] == fill).all() and (fitted[:, :, -15:] == fill).all()
        assert (fitted[:, :, 14] != fill).any() and (fitted[:, :, -16] != fill).any()
