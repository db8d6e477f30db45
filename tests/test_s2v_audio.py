"""S2V audio path: parity with the official AudioEncoder (tests/fixtures/s2v/audio.*) from the
16 kHz waveform on, and PyAV decoding with its refusals of bad files."""

from __future__ import annotations

import struct

import av
import numpy as np
import pytest
import torch

from conftest import FIXTURES, assert_parity, load_fixture
from wanrt.audio import (SpeechFeatureExtractor, audio_embedding, bucket_indices, read_audio,
                         resample_features, speech_waveform)
from wanrt.errors import InputError

WAV2VEC = FIXTURES / "s2v" / "Wan2.2-S2V-14B-tiny" / "wav2vec2-large-xlsr-53-english"


def write_wav(path, samples: np.ndarray, rate: int, container_format: str = "wav") -> None:
    """`[channels, n]` float samples as 16-bit PCM WAV (or FLAC)."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    codec = {"wav": "pcm_s16le", "flac": "flac"}[container_format]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if pcm.shape[1]:
            frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout=layout)
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        for packet in stream.encode(None):
            container.mux(packet)


def test_wav2vec_interpolation_and_buckets_match_official():
    tensors, meta = load_fixture("s2v/audio")
    extractor = SpeechFeatureExtractor(WAV2VEC)
    hidden = extractor.hidden_states(tensors["waveform_16k"])
    assert_parity(hidden, tensors["hidden_states"], "hidden_states")
    feat = resample_features(tensors["hidden_states"])
    assert_parity(feat, tensors["feat_30fps"], "feat_30fps")
    indices, num_clips = bucket_indices(feat.shape[1], fps=16, clip_frames=12)
    assert indices.tolist() == meta["bucket_sample_indices"] and num_clips == meta["num_repeat"]
    embedding, _ = audio_embedding(tensors["feat_30fps"], fps=16, clip_frames=12)
    assert_parity(embedding, tensors["audio_emb"], "audio_emb")
    assert torch.equal(embedding[0].permute(2, 0, 1), tensors["bucket"])


def test_decoded_wav_resamples_to_16k_mono(tmp_path):
    rate, seconds = 44100, 0.5
    t = np.arange(int(rate * seconds)) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 220 * t), 0.25 * np.sin(2 * np.pi * 220 * t)
    path = tmp_path / "stereo.wav"
    write_wav(path, np.stack([left, right]), rate)
    native = read_audio(path)
    assert native.rate == rate and native.samples.shape == (2, len(t))
    wave = speech_waveform(path)
    assert abs(wave.shape[0] - 8000) <= 32
    # The mono mix of a 220 Hz tone of amplitude (0.5 + 0.25) / 2, away from the edges.
    assert abs(wave[1000:7000].abs().max().item() - 0.375) < 0.01


def flac_declaring(path, total_samples: int) -> None:
    """A 0.1 s silent 16 kHz FLAC whose STREAMINFO claims `total_samples` (0: unknown)."""
    write_wav(path, np.zeros((1, 1600)), 16000, container_format="flac")
    data = bytearray(path.read_bytes())
    # STREAMINFO starts at byte 8; its 64 bits at offset 10 end with the 36-bit sample count.
    (packed,) = struct.unpack(">Q", data[18:26])
    data[18:26] = struct.pack(">Q", (packed >> 36 << 36) | total_samples)
    path.write_bytes(bytes(data))


def test_audio_without_declared_duration_stops_decoding_at_the_limit(tmp_path):
    path = tmp_path / "unknown_length.flac"
    flac_declaring(path, 0)
    assert read_audio(path).samples.shape == (1, 1600)
    with pytest.raises(InputError, match="longer than"):
        read_audio(path, max_seconds=0.05)


@pytest.mark.parametrize("kind", ["text", "empty", "ten_hours", "missing"])
def test_bad_audio_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / "audio.wav"
    if kind == "text":
        path.write_text("this is not audio\n" * 20)
    elif kind == "empty":
        write_wav(path, np.zeros((1, 0)), 16000)
    elif kind == "ten_hours":
        # A FLAC file whose STREAMINFO declares 10 h of 16 kHz audio: refused from the
        # metadata, before anything is decoded.
        flac_declaring(path, 10 * 3600 * 16000)
    with pytest.raises(InputError) as error:
        speech_waveform(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "--audio" in message
    if kind == "ten_hours":
        assert "36000 s long" in message
