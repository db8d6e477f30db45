"""Architecture configs and task presets, as frozen dataclasses.

Architecture configs (`DiTConfig`, `VAEConfig`, `T5Config`) describe what a checkpoint
contains; `SampleDefaults` are the run options the official code uses for a task. A
`TaskSpec` ties them together. The numbers are those of the official Wan2.2 configs
(`wan/configs/*.py`); `get_task` is the only way to look one up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from wanrt.errors import ConfigError, parse_choice


class ModelType(str, Enum):
    T2V = "t2v"
    I2V = "i2v"
    TI2V = "ti2v"
    S2V = "s2v"
    ANIMATE = "animate"


class VAEVersion(str, Enum):
    WAN2_1 = "2.1"
    WAN2_2 = "2.2"


def require_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """Refuse a config value that is not a positive integer (or a tuple of them): a
    hand-edited config.json with `"num_heads": 0` or `"dim": "64"` is one clear line."""
    for name in names:
        value = getattr(config, name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ConfigError(f"{name} {value!r} must be a positive integer")


@dataclass(frozen=True)
class DiTConfig:
    """The Wan DiT architecture (official `WanModel.__init__` arguments)."""

    model_type: ModelType
    in_dim: int
    out_dim: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    # The official config.json never stores text_dim (it is in `ignore_for_config`), so a
    # real checkpoint always has 4096, the umt5-xxl width.
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_type", parse_choice(ModelType, self.model_type, "model_type", ConfigError))
        require_positive_ints(self, ("in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers",
                                     "freq_dim", "text_dim", "text_len"))
        if not isinstance(self.patch_size, (list, tuple)) or len(self.patch_size) != 3:
            raise ConfigError(f"patch_size {self.patch_size!r} must be three positive integers")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        require_positive_ints(self, ("patch_size",))
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ConfigError(f"eps {self.eps!r} must be a small positive number such as 1e-6")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    # Keys of the official config.json (written by diffusers' ConfigMixin) that are not
    # architecture: they are accepted and ignored.
    _OFFICIAL_JSON_METADATA = frozenset({"_class_name", "_diffusers_version", "_name_or_path"})

    @classmethod
    def from_official_json(cls, raw: Mapping[str, Any], source: str = "config.json") -> "DiTConfig":
        """Build from an official `config.json`; unknown keys are refused, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k not in cls._OFFICIAL_JSON_METADATA}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown DiT config keys {unknown}")
        # The official code ignores these even if present (see `ignore_for_config`).
        for ignored in ("text_dim", "patch_size", "qk_norm", "cross_attn_norm"):
            kwargs.pop(ignored, None)
        missing = sorted({"in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers"} - set(kwargs))
        if missing:
            raise ConfigError(f"{source}: missing DiT config keys {missing}")
        try:
            return cls(**kwargs)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class S2VConfig:
    """What the S2V DiT adds to `DiTConfig` (official `WanModel_S2V.__init__` arguments).

    Only the released variant is implemented: AdaIN audio injection ('attn_norm'),
    FramePack motion tokens with 'padd', no motioner transformer, ref/motion tokens at t=0.
    """

    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    add_last_motion: bool = True
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    enable_motioner: bool = False
    zero_timestep: bool = True

    # The released values of the switches wanrt implements; anything else is refused.
    _SUPPORTED = {"enable_adain": True, "adain_mode": "attn_norm", "enable_framepack": True,
                  "framepack_drop_mode": "padd", "enable_motioner": False, "zero_timestep": True}
    # Official config.json keys that only matter for training or unused branches.
    _IGNORED_JSON = frozenset({"zero_init", "enable_tsm", "trainable_token_pos_emb", "motion_token_num"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio_inject_layers", tuple(self.audio_inject_layers))
        for name, value in self._SUPPORTED.items():
            if getattr(self, name) != value:
                raise ConfigError(f"S2V {name}={getattr(self, name)!r} is not implemented; "
                                  f"the released S2V-14B uses {value!r}")

    @classmethod
    def split_official_json(cls, raw: Mapping[str, Any], source: str = "config.json"
                            ) -> tuple["S2VConfig", dict[str, Any]]:
        """(S2V extras, the remaining `WanModel` keys for `DiTConfig.from_official_json`)."""
        own = {f.name for f in dataclasses.fields(cls)}
        extras = {k: v for k, v in raw.items() if k in own}
        rest = {k: v for k, v in raw.items() if k not in own and k not in cls._IGNORED_JSON}
        try:
            return cls(**extras), rest
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class VAEConfig:
    """The causal video VAE (official `WanVAE_` arguments plus latent normalisation)."""

    version: VAEVersion
    dim: int
    z_dim: int
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    # Wan2.2 decodes with a wider decoder than it encodes; Wan2.1 uses `dim` for both.
    dec_dim: int | None = None
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", VAEVersion(self.version))
        for name in ("latent_mean", "latent_std", "dim_mult", "temporal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ConfigError(f"VAE {self.version.value}: latent mean/std need {self.z_dim} values")

    @property
    def decoder_dim(self) -> int:
        return self.dec_dim if self.dec_dim is not None else self.dim

    @property
    def stride(self) -> tuple[int, int, int]:
        """(t, h, w) compression between pixels and latents."""
        spatial = 2 ** (len(self.dim_mult) - 1)
        if self.version is VAEVersion.WAN2_2:
            spatial *= 2  # the 2x2 pixel patchify in front of the encoder
        return (2 ** sum(self.temporal_downsample), spatial, spatial)


@dataclass(frozen=True)
class T5Config:
    """The umt5-xxl encoder (official `umt5_xxl(encoder_only=True)` arguments)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    text_len: int = 512

    def __post_init__(self) -> None:
        require_positive_ints(self, ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers",
                                     "num_buckets", "text_len"))


@dataclass(frozen=True)
class SampleDefaults:
    """Run options the official generate.py uses for a task; every one is overridable."""

    shift: float
    steps: int
    # (low-noise, high-noise), the official order; a single-model task repeats one value.
    guide_scale: tuple[float, float]
    sizes: tuple[str, ...]
    frame_num: int = 81
    fps: int = 16
    # Timestep fraction at which sampling switches from the high- to the low-noise expert.
    boundary: float | None = None
    num_train_timesteps: int = 1000
    negative_prompt: str = ""
    solver: str = "unipc"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config
    sample: SampleDefaults
    # Checkpoint names inside the official folder.
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    vae_checkpoint: str = "Wan2.1_VAE.pth"
    # MoE tasks have two experts in these sub-folders; single-model tasks have none.
    high_noise_subdir: str | None = None
    low_noise_subdir: str | None = None
    # The S2V DiT's architecture beyond `dit` (s2v tasks only).
    s2v: S2VConfig | None = None
    # Task constants beyond the shared ones (s2v's audio model and motion frames, animate's).
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.high_noise_subdir is not None

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        return self.vae.stride


OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

SIZES: dict[str, tuple[int, int]] = {
    # "W*H" as in the official SIZE_CONFIGS: the first number is the width.
    "720*1280": (720, 1280),
    "1280*720": (1280, 720),
    "480*832": (480, 832),
    "832*480": (832, 480),
    "704*1280": (704, 1280),
    "1280*704": (1280, 704),
    "1024*704": (1024, 704),
    "704*1024": (704, 1024),
}

WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

WAN21_VAE = VAEConfig(version=VAEVersion.WAN2_1, dim=96, z_dim=16,
                      latent_mean=WAN21_LATENT_MEAN, latent_std=WAN21_LATENT_STD)
WAN22_VAE = VAEConfig(version=VAEVersion.WAN2_2, dim=160, dec_dim=256, z_dim=48,
                      latent_mean=WAN22_LATENT_MEAN, latent_std=WAN22_LATENT_STD)
UMT5_XXL = T5Config()

_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# The first size of a task is its default, as the official CLI's `--size 1280*720`.
_A14B_SIZES = ("1280*720", "720*1280", "832*480", "480*832")
_MOE_DIRS = dict(high_noise_subdir="high_noise_model", low_noise_subdir="low_noise_model")

_TASKS: dict[str, TaskSpec] = {}


def _register(spec: TaskSpec) -> TaskSpec:
    _TASKS[spec.name] = spec
    return spec


_register(TaskSpec(
    name="t2v-A14B",
    dit=DiTConfig(model_type=ModelType.T2V, in_dim=16, out_dim=16, **_A14B),
    vae=WAN21_VAE, t5=UMT5_XXL, **_MOE_DIRS,
    sample=SampleDefaults(shift=12.0, steps=40, boundary=0.875, guide_scale=(3.0, 4.0),
                          sizes=_A14B_SIZES, negative_prompt=OFFICIAL_NEGATIVE_PROMPT),
))
_register(TaskSpec(
    name="i2v-A14B",
    dit=DiTConfig(model_type=ModelType.I2V, in_dim=36, out_dim=16, **_A14B),
    vae=WAN21_VAE, t5=UMT5_XXL, **_MOE_DIRS,
    sample=SampleDefaults(shift=5.0, steps=40, boundary=0.900, guide_scale=(3.5, 3.5),
                          sizes=_A14B_SIZES, negative_prompt=OFFICIAL_NEGATIVE_PROMPT),
))
_register(TaskSpec(
    name="ti2v-5B",
    dit=DiTConfig(model_type=ModelType.TI2V, in_dim=48, out_dim=48, dim=3072, ffn_dim=14336,
                  num_heads=24, num_layers=30),
    vae=WAN22_VAE, t5=UMT5_XXL, vae_checkpoint="Wan2.2_VAE.pth",
    sample=SampleDefaults(shift=5.0, steps=50, guide_scale=(5.0, 5.0), frame_num=121, fps=24,
                          sizes=("1280*704", "704*1280"),
                          negative_prompt=OFFICIAL_NEGATIVE_PROMPT),
))
_register(TaskSpec(
    name="s2v-14B",
    dit=DiTConfig(model_type=ModelType.S2V, in_dim=16, out_dim=16, **_A14B),
    vae=WAN21_VAE, t5=UMT5_XXL,
    sample=SampleDefaults(shift=3.0, steps=40, guide_scale=(4.5, 4.5),
                          sizes=_A14B_SIZES + ("1024*704", "704*1024", "704*1280", "1280*704"),
                          negative_prompt=S2V_NEGATIVE_PROMPT),
    s2v=S2VConfig(),
    # Official pipeline constants (wan/configs/wan_s2v_14B.py, generate.py --infer_frames).
    extras=dict(wav2vec="wav2vec2-large-xlsr-53-english", motion_frames=73, drop_first_motion=True,
                infer_frames=80),
))
_register(TaskSpec(
    name="animate-14B",
    dit=DiTConfig(model_type=ModelType.ANIMATE, in_dim=36, out_dim=16, **_A14B),
    vae=WAN21_VAE, t5=UMT5_XXL,
    sample=SampleDefaults(shift=5.0, steps=20, guide_scale=(1.0, 1.0), frame_num=77, fps=30,
                          sizes=("1280*720", "720*1280"),
                          negative_prompt=OFFICIAL_NEGATIVE_PROMPT),
    extras=dict(clip_checkpoint="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                clip_tokenizer="xlm-roberta-large", clip_heads=16, lora_checkpoint="relighting_lora.ckpt",
                use_face_encoder=True, motion_encoder_dim=512,
                default_prompt="视频中的人在做动作"),
))

# Tiny presets: the official layout at toy widths, used by the tests and the demo. Their
# DiT widths match the golden fixtures (dim 64, 4 heads, 2 layers, text_len 16).
_TINY_DIT = dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_len=16,
                 text_dim=32)
TINY_T5 = T5Config(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
                   num_buckets=32, text_len=16)
TINY_WAN21_VAE = dataclasses.replace(WAN21_VAE, dim=8)
TINY_WAN22_VAE = dataclasses.replace(WAN22_VAE, dim=8, dec_dim=12)


def _shrunk(name: str, full: str, tiny_vae: VAEConfig, sizes: tuple[str, ...]) -> TaskSpec:
    """A tiny copy of an official task: same semantics and defaults, toy widths."""
    spec = _TASKS[full]
    return dataclasses.replace(
        spec, name=name, dit=dataclasses.replace(spec.dit, **_TINY_DIT), vae=tiny_vae, t5=TINY_T5,
        sample=dataclasses.replace(spec.sample, steps=6, frame_num=9, sizes=sizes))


_register(_shrunk("tiny-t2v", "t2v-A14B", TINY_WAN21_VAE, ("64*64", "96*64")))
_register(_shrunk("tiny-i2v", "i2v-A14B", TINY_WAN21_VAE, ("64*64", "96*64")))
_register(_shrunk("tiny-ti2v", "ti2v-5B", TINY_WAN22_VAE, ("128*64", "64*128")))
# S2V at toy widths: a 16-wide, 24-layer wav2vec2 (the fixtures' shape), audio injected
# after both blocks, 8-frame clips of 64x64 (8x8 latents, the least FramePack's 4x patch takes)
# and 9 motion frames (3 latents) instead of 73, so a CPU encodes them in a second.
_register(dataclasses.replace(
    _shrunk("tiny-s2v", "s2v-14B", TINY_WAN21_VAE, ("64*64", "128*64")),
    s2v=S2VConfig(audio_dim=16, audio_inject_layers=(0, 1)),
    extras={**_TASKS["s2v-14B"].extras, "infer_frames": 8, "motion_frames": 9}))
# Animate puts a face adapter after every 5th block, so its tiny DiT has 5 layers; the tiny
# CLIP tower has 2 heads (its size comes from the pose video, so `sizes` is informative).
_TINY_ANIMATE = _shrunk("tiny-animate", "animate-14B", TINY_WAN21_VAE, ("64*64",))
_register(dataclasses.replace(_TINY_ANIMATE, dit=dataclasses.replace(_TINY_ANIMATE.dit, num_layers=5),
                              extras={**_TINY_ANIMATE.extras, "clip_heads": 2}))

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> TaskSpec:
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}") from None


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' -> (width, height), the official convention."""
    try:
        width, height = (int(v) for v in size.split("*"))
    except ValueError:
        raise ConfigError(f"size {size!r} is not of the form WIDTH*HEIGHT, e.g. 832*480") from None
    return width, height
