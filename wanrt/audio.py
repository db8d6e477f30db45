"""Speech audio for S2V: decoding with PyAV, wav2vec2 features, and the official bucketing.

The official pipeline (`wan/modules/s2v/audio_encoder.py`) computes, for an audio file:
1. `librosa.load(path, sr=16000)`: mono (the mean of the channels) at 16 kHz. Here PyAV
   (FFmpeg's swresample) decodes and resamples; the samples differ from librosa's soxr
   resampler by resampler rounding, every later step is the official arithmetic;
2. wav2vec2 (`Wav2Vec2ForCTC`, the checkpoint's `wav2vec2-large-xlsr-53-english/`) over the
   whole clip, normalised by its feature extractor, keeping all 25 hidden states (50 fps);
3. 50 -> 30 fps by linear interpolation (align_corners=True) to `int(T / 50 * 30)` frames;
4. 30 -> video fps (16) by picking frame `round(i * 30 / 16)` (numpy round-half-to-even),
   zero past the end, for `num_clips * clip_frames` frames, `num_clips = int(T30 / (clip_frames
   * 30 / 16)) + 1`; the result is `[1, 25, C, N]` and clip r uses frames `[r*clip, (r+1)*clip)`.

Inputs are checked before anything large is allocated: the duration comes from the
container's metadata, and decoding stops as soon as it passes the limit anyway (a stream
without a declared duration cannot make the decoder hold more than the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wanrt.errors import CheckpointError, InputError

WAV2VEC_RATE = 16000
WAV2VEC_FPS = 50
AUDIO_FEATURE_FPS = 30  # the official `AudioEncoder.video_rate`
# wav2vec2 attends over the whole file at once (as the official code runs it), so its memory
# grows with the square of the duration; 10 minutes is ~120 clips of 80 frames.
MAX_AUDIO_SECONDS = 600.0


@dataclass(frozen=True)
class AudioTrack:
    """Decoded audio: float32 samples in [-1, 1], `[channels, samples]`, at `rate` Hz."""

    samples: Tensor
    rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.rate


_AUDIO_FIX = "pass a wav/mp3/m4a/flac file with speech"


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def probe_audio(path: Path, max_seconds: float = MAX_AUDIO_SECONDS) -> None:
    """Refuse, in one line and without decoding, a missing file, one without an audio stream,
    or one whose container declares it empty or longer than `max_seconds`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--audio {path} does not exist or is not a file; {_AUDIO_FIX}")
    try:
        with av.open(str(path)) as container:
            _check_declared(container, path, max_seconds)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise InputError(f"--audio {path} cannot be decoded ({_first_line(error)}); {_AUDIO_FIX}") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_declared(container, path: Path, max_seconds: float):
    """The first audio stream, after checking what its metadata declares."""
    if not container.streams.audio:
        raise InputError(f"--audio {path} has no audio stream; {_AUDIO_FIX}")
    stream = container.streams.audio[0]
    declared = _declared_seconds(container, stream)
    if declared is not None and declared > max_seconds:
        raise InputError(f"--audio {path} is {declared:.0f} s long, more than {max_seconds:.0f} s; "
                         f"trim it (e.g. ffmpeg -t {max_seconds:.0f}) or split it")
    if declared == 0:
        raise InputError(f"--audio {path} contains no audio samples; {_AUDIO_FIX}")
    return stream


def read_audio(path: Path, rate: int | None = None, mono: bool = False,
               max_seconds: float = MAX_AUDIO_SECONDS) -> AudioTrack:
    """The first audio stream of `path`, resampled to `rate` (default: its own) and, with
    `mono`, averaged over its channels. One-line `InputError` for a missing, non-audio,
    empty or too long file, raised before the decoder holds more than `max_seconds`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--audio {path} does not exist or is not a file; {_AUDIO_FIX}")
    try:
        with av.open(str(path)) as container:
            stream = _check_declared(container, path, max_seconds)
            chunks = _decode(container, stream, rate, max_seconds, path)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise InputError(f"--audio {path} cannot be decoded ({_first_line(error)}); {_AUDIO_FIX}") from None
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise InputError(f"--audio {path} contains no audio samples; {_AUDIO_FIX}")
    samples = torch.from_numpy(np.concatenate(chunks, axis=1))
    if mono:
        samples = samples.mean(dim=0, keepdim=True)
    return AudioTrack(samples, rate or stream.sample_rate)


def _decode(container, stream, rate: int | None, max_seconds: float, path: Path) -> list[np.ndarray]:
    """Float planar chunks `[channels, n]`; stops with an error once past `max_seconds`."""
    resampler = None
    chunks: list[np.ndarray] = []
    total = 0

    def take(frames) -> None:
        nonlocal total
        for frame in frames:
            array = frame.to_ndarray().astype(np.float32, copy=False)
            chunks.append(array)
            total += array.shape[1]
        if total > max_seconds * (rate or stream.sample_rate):
            raise InputError(f"--audio {path} is longer than {max_seconds:.0f} s; trim it "
                             f"(e.g. ffmpeg -t {max_seconds:.0f}) or split it")

    for frame in container.decode(stream):
        if resampler is None:
            # Planar float at the target rate; the channel layout is kept and averaged later.
            resampler = av.AudioResampler(format="fltp", layout=frame.layout.name,
                                          rate=rate or frame.sample_rate)
        take(resampler.resample(frame))
    if resampler is not None:
        take(resampler.resample(None))  # what the resampler still holds
    return chunks


def write_wav(track: AudioTrack, path: Path) -> Path:
    """`track` as 16-bit PCM WAV at `path`, atomically."""
    from wanrt.loading.save import write_atomic

    layout = {1: "mono", 2: "stereo"}[track.samples.shape[0]]
    pcm = (track.samples.clamp(-1, 1) * 32767).round().to(torch.int16).T.reshape(1, -1).contiguous().numpy()

    def write(temporary: Path) -> None:
        with av.open(str(temporary), "w", format="wav") as container:
            stream = container.add_stream("pcm_s16le", rate=track.rate, layout=layout)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
            frame.sample_rate = track.rate
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    write_atomic(Path(path), write)
    return Path(path)


def speech_waveform(path: Path) -> Tensor:
    """What the official `librosa.load(path, sr=16000)` gives: mono float32 `[N]` at 16 kHz."""
    return read_audio(path, rate=WAV2VEC_RATE, mono=True).samples[0]


class SpeechFeatureExtractor:
    """wav2vec2 (`Wav2Vec2ForCTC`) from the checkpoint's folder: all hidden states at 50 fps."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu") -> None:
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: the wav2vec2 model folder is missing; S2V needs "
                                  "wav2vec2-large-xlsr-53-english/ inside --ckpt-dir")
        self.device = torch.device(device)
        self.processor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
        self.model = Wav2Vec2ForCTC.from_pretrained(str(folder)).eval().requires_grad_(False)

    def hidden_states(self, waveform: Tensor) -> Tensor:
        """`[N]` at 16 kHz -> `[num_layers + 1, T50, C]` float32 (all hidden states, no mask,
        as the official `extract_audio_feat`).

        The last entry is the encoder's output (`last_hidden_state`): with the stable layer
        norm of xlsr-53 that is the final LayerNorm of the last layer, which transformers 4.x
        (the official environment) returns as the last hidden state and 5.x no longer does."""
        values = self.processor(waveform.numpy(), sampling_rate=WAV2VEC_RATE, return_tensors="pt").input_values
        self.model.to(self.device)
        with torch.no_grad():
            out = self.model.wav2vec2(values.to(self.device), output_hidden_states=True)
        self.model.to("cpu")
        return torch.cat([*out.hidden_states[:-1], out.last_hidden_state]).float().cpu()


def resample_features(features: Tensor, input_fps: int = WAV2VEC_FPS,
                      output_fps: int = AUDIO_FEATURE_FPS) -> Tensor:
    """`[L, T, C]` -> `[L, int(T / input_fps * output_fps), C]`, linear with align_corners."""
    length = int(features.shape[1] / float(input_fps) * output_fps)
    return F.interpolate(features.transpose(1, 2), size=length, mode="linear",
                         align_corners=True).transpose(1, 2)


def bucket_indices(num_features: int, fps: int, clip_frames: int,
                   feature_fps: int = AUDIO_FEATURE_FPS) -> tuple[np.ndarray, int]:
    """(feature index of each video frame, number of clips) as the official
    `get_audio_embed_bucket_fps(m=0)`; indices >= num_features mean silence (zeros)."""
    num_clips = int(num_features / (clip_frames * feature_fps / fps)) + 1
    frames = num_clips * clip_frames
    # The official code pads the features to cover every frame, then clips to that length.
    padded_length = math.ceil(frames / fps * feature_fps)
    times = np.linspace(0, frames / fps, frames, endpoint=False)
    indices = np.clip(np.round(times * feature_fps).astype(int), 0, padded_length - 1)
    return indices, num_clips


def audio_embedding(features_30fps: Tensor, fps: int, clip_frames: int) -> tuple[Tensor, int]:
    """`[L, T30, C]` -> (`[1, L, C, num_clips * clip_frames]`, num_clips): the per-video-frame
    features the DiT takes, zero past the end of the audio."""
    layers, length, channels = features_30fps.shape
    indices, num_clips = bucket_indices(length, fps, clip_frames)
    bucket = features_30fps.new_zeros(len(indices), layers, channels)
    valid = torch.from_numpy(indices < length)
    bucket[valid] = features_30fps[:, torch.from_numpy(indices[indices < length])].transpose(0, 1)
    return bucket[None].permute(0, 2, 3, 1), num_clips


def encode_speech(path: Path, extractor: SpeechFeatureExtractor, fps: int, clip_frames: int) -> tuple[Tensor, int]:
    """An audio file -> (`[1, 25, C, N]` features per video frame, clips the audio covers)."""
    hidden = extractor.hidden_states(speech_waveform(path))
    return audio_embedding(resample_features(hidden), fps, clip_frames)
