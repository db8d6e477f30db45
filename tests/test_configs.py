"""Task presets carry the official Wan2.2 numbers; configs refuse what they do not know."""

from __future__ import annotations

import dataclasses

import pytest

from wanrt.configs import (
    OFFICIAL_NEGATIVE_PROMPT,
    TASK_NAMES,
    DiTConfig,
    ModelType,
    get_task,
    parse_size,
)
from wanrt.errors import ConfigError


def test_every_official_task_is_present_with_its_sample_defaults():
    expected = {
        # task: (shift, steps, guide (low, high), boundary, frames, fps, vae stride, z_dim)
        "t2v-A14B": (12.0, 40, (3.0, 4.0), 0.875, 81, 16, (4, 8, 8), 16),
        "i2v-A14B": (5.0, 40, (3.5, 3.5), 0.900, 81, 16, (4, 8, 8), 16),
        "ti2v-5B": (5.0, 50, (5.0, 5.0), None, 121, 24, (4, 16, 16), 48),
        "s2v-14B": (3.0, 40, (4.5, 4.5), None, 81, 16, (4, 8, 8), 16),
        "animate-14B": (5.0, 20, (1.0, 1.0), None, 77, 30, (4, 8, 8), 16),
    }
    for name, (shift, steps, guide, boundary, frames, fps, stride, z_dim) in expected.items():
        task = get_task(name)
        s = task.sample
        assert (s.shift, s.steps, s.guide_scale, s.boundary, s.frame_num, s.fps) == \
            (shift, steps, guide, boundary, frames, fps), name
        assert task.vae_stride == stride and task.vae.z_dim == z_dim, name
    assert set(expected) <= set(TASK_NAMES)


def test_architecture_numbers():
    a14b = get_task("t2v-A14B").dit
    assert (a14b.dim, a14b.ffn_dim, a14b.num_heads, a14b.num_layers, a14b.head_dim) == (5120, 13824, 40, 40, 128)
    assert get_task("i2v-A14B").dit.in_dim == 36
    five_b = get_task("ti2v-5B").dit
    assert (five_b.dim, five_b.ffn_dim, five_b.num_heads, five_b.num_layers) == (3072, 14336, 24, 30)
    assert (five_b.in_dim, five_b.out_dim) == (48, 48)
    assert get_task("t2v-A14B").is_moe and not get_task("ti2v-5B").is_moe
    assert get_task("t2v-A14B").sample.negative_prompt == OFFICIAL_NEGATIVE_PROMPT
    assert get_task("ti2v-5B").sample.sizes == ("1280*704", "704*1280")
    # The first size is the default, as the official CLI's --size 1280*720.
    assert get_task("t2v-A14B").sample.sizes[0] == "1280*720"


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("t2v-A14B").dit.dim = 1


def test_unknown_task_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown task 't2v-1.3B'; choose one of t2v-A14B"):
        get_task("t2v-1.3B")


def test_official_config_json_is_read_and_unknown_keys_refused():
    raw = {"_class_name": "WanModel", "_diffusers_version": "0.39.0", "dim": 64, "eps": 1e-6,
           "ffn_dim": 128, "freq_dim": 32, "in_dim": 16, "model_type": "t2v", "num_heads": 4,
           "num_layers": 2, "out_dim": 16, "text_len": 16}
    config = DiTConfig.from_official_json(raw)
    assert config.model_type is ModelType.T2V and config.text_dim == 4096
    with pytest.raises(ConfigError, match=r"unknown DiT config keys \['window'\]"):
        DiTConfig.from_official_json({**raw, "window": 1})
    with pytest.raises(ConfigError, match=r"missing DiT config keys \['dim'\]"):
        DiTConfig.from_official_json({k: v for k, v in raw.items() if k != "dim"})


def test_sizes_are_width_by_height():
    assert parse_size("832*480") == (832, 480)
    with pytest.raises(ConfigError, match="not of the form WIDTH\\*HEIGHT"):
        parse_size("832x480")
