"""The memory planner's numbers for the real configs against hand-computed byte counts."""

from __future__ import annotations

import pytest

from wanrt.configs import get_task
from wanrt.errors import InputError
from wanrt.runtime import planner
from wanrt.runtime.planner import GIB, Precision, dit_bytes, make_plan, require_fit, token_grid


def _hand_counted_block(dim: int, ffn: int, weight_bytes: int, scales: bool) -> int:
    linear_weights = 8 * dim * dim + 2 * dim * ffn          # self/cross q,k,v,o + FFN in/out
    out_channels = 9 * dim + ffn                               # one scale per output channel
    biases = 8 * dim + ffn + dim                               # bf16
    norms = 4 * dim + 2 * dim                                  # qk-norm gains + norm3 affine, bf16
    modulation = 6 * dim * 4                                   # float32
    return (linear_weights * weight_bytes + (out_channels * 4 if scales else 0)
            + (biases + norms) * 2 + modulation)


def test_a14b_block_bytes_match_hand_count_and_the_measured_slot():
    bf16 = dit_bytes(get_task("t2v-A14B").dit, Precision.BF16)
    assert bf16.block == _hand_counted_block(5120, 13824, 2, scales=False) == 702_850_048
    # stream_bench measured the same slot size on the H100 (benchmarks/results/stream_h100.json).
    fp8 = dit_bytes(get_task("t2v-A14B").dit, Precision.FP8)
    assert fp8.block == _hand_counted_block(5120, 13824, 1, scales=True)
    assert bf16.num_blocks == 40


def test_a14b_non_block_bytes_match_hand_count():
    dim = 5120
    bf16_parts = (16 * 4 * dim + dim) + (4096 * dim + dim + dim * dim + dim)   # patch, text MLP
    fp32_parts = ((256 * dim + dim + dim * dim + dim)                         # time MLP
                  + (dim * 6 * dim + 6 * dim)                                 # time projection
                  + (dim * 64 + 64 + 2 * dim))                                # head + modulation
    assert dit_bytes(get_task("t2v-A14B").dit, Precision.BF16).other == bf16_parts * 2 + fp32_parts * 4


def test_5b_block_bytes():
    assert dit_bytes(get_task("ti2v-5B").dit, Precision.BF16).block == _hand_counted_block(3072, 14336, 2, False)


def test_token_grids():
    assert token_grid(get_task("t2v-A14B"), "832*480", 81) == (21, 30, 52)      # 32,760 tokens
    assert token_grid(get_task("t2v-A14B"), "1280*720", 81) == (21, 45, 80)     # 75,600
    assert token_grid(get_task("ti2v-5B"), "1280*704", 121) == (31, 22, 40)     # 27,280


def test_a14b_480p_bf16_in_24_gib_streams_and_fits():
    plan = make_plan(get_task("t2v-A14B"), "832*480", 81, "bf16", vram_gib=24, ram_gib=64)
    assert plan.fits and plan.streaming
    assert plan.peak_vram_sampling <= 24 * GIB and plan.peak_vram_decode <= 24 * GIB
    # Every streamed block crosses PCIe twice per step (cond and uncond forwards).
    assert plan.bytes_per_step == 2 * plan.streamed_blocks * 702_850_048
    assert plan.resident_blocks + plan.streamed_blocks == 40
    # The block activations at 32,760 tokens were measured at 4.06 GB on the H100.
    block_peak = plan.activation_bytes - 32760 * 5120 * 4
    assert abs(block_peak - 4.06e9) / 4.06e9 < 0.05
    assert "fits" in plan.lines()[-1]


def test_plenty_of_vram_keeps_everything_resident():
    plan = make_plan(get_task("ti2v-5B"), "1280*704", 121, "bf16", vram_gib=80, ram_gib=128)
    assert plan.fits and not plan.streaming and plan.bytes_per_step == 0


def test_pinning_is_capped_and_the_rest_stays_pageable(monkeypatch):
    # With the shipped cap (60% of RAM) the supported A14B sizes all pin fully; a lower cap
    # exercises the partial-pinning fallback.
    monkeypatch.setattr(planner, "MAX_PINNED_FRACTION", 0.2)
    plan = make_plan(get_task("t2v-A14B"), "832*480", 81, "bf16", vram_gib=18, ram_gib=80)
    assert plan.fits and plan.streaming and plan.ram_mode == "both"
    assert plan.pinned_bytes == int(0.2 * 80 * GIB) < 2 * plan.streamed_blocks * plan.block_bytes
    assert any("partial pinning" in note for note in plan.notes)


def test_impossible_plan_is_refused_with_a_remedy_that_fits():
    plan = make_plan(get_task("t2v-A14B"), "1280*720", 81, "bf16", vram_gib=8, ram_gib=64)
    assert not plan.fits
    # fp8 does not fit 8 GiB at 720P either (the activations alone take 10 GiB): the search
    # moves on to fewer frames, and the remedy it names is a plan that fits.
    with pytest.raises(InputError, match="does not fit the budget: sampling needs .* try --frame-num 21"):
        require_fit(plan)
    fixed = make_plan(get_task("t2v-A14B"), "1280*720", 21, "bf16", vram_gib=8, ram_gib=64)
    assert fixed.fits
    # Lower precision is tried first where it helps.
    assert make_plan(get_task("t2v-A14B"), "832*480", 81, "bf16", vram_gib=24, ram_gib=24, ram_mode="one-expert").remedy.startswith(
        "--precision fp8")


def test_fp8_plan_counts_the_bf16_first_and_last_blocks():
    bf16, fp8 = (dit_bytes(get_task("t2v-A14B").dit, p) for p in (Precision.BF16, Precision.FP8))
    plan = make_plan(get_task("t2v-A14B"), "832*480", 81, "fp8", vram_gib=16, ram_gib=64)
    assert plan.expert_bytes == fp8.total + 2 * (bf16.block - fp8.block)
    # The last block (bf16) may stream, so the slots are bf16-block sized.
    assert plan.streaming and plan.slot_bytes == bf16.block
    assert plan.bytes_per_step == 2 * (plan.streamed_blocks * fp8.block + bf16.block - fp8.block)


# ---------------------------------------------------------------- issue 17: small machines

from typer.testing import CliRunner  # noqa: E402

from wanrt.cli.app import app  # noqa: E402
from wanrt.configs import WAN21_VAE  # noqa: E402
from wanrt.runtime.planner import RamMode, choose_vae_tiling, vae_decode_peak  # noqa: E402


@pytest.mark.parametrize("args", [
    ["--task", "t2v-A14B", "--size", "1280*720", "--vram", "24", "--ram", "32", "--precision", "fp8"],
    ["--task", "t2v-A14B", "--size", "832*480", "--vram", "16", "--ram", "32", "--precision", "fp8"],
    ["--task", "ti2v-5B", "--size", "1280*704", "--vram", "12", "--ram", "32"],
])
def test_small_machines_fit(args):
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("fits")
    assert "VAE: " in result.output and " tiles of " in result.output
    assert "predicted time on an H100" in result.output


def test_720p_a14b_in_24_gib_tiles_the_vae_and_holds_one_expert_in_32_gib():
    plan = make_plan(get_task("t2v-A14B"), "1280*720", 81, "fp8", vram_gib=24, ram_gib=32)
    assert plan.fits and plan.vae_tiling is not None and plan.vae_tiles >= 2
    assert plan.peak_vram_decode <= 24 * GIB < vae_decode_peak(WAN21_VAE, 1280 * 720)
    assert plan.ram_mode == RamMode.ONE_EXPERT.value and plan.peak_host_ram <= 32 * GIB
    # Both experts would not fit 32 GiB; one expert + VAE + the host reserve do.
    both = make_plan(get_task("t2v-A14B"), "1280*720", 81, "fp8", vram_gib=24, ram_gib=32, ram_mode="both")
    assert not both.fits and both.remedy.startswith("--ram-mode one-expert")
    assert plan.host_weight_bytes == plan.expert_bytes + planner.VAE_WEIGHT_BYTES[WAN21_VAE.version]


def test_tiling_is_the_fewest_tiles_that_fit_and_none_when_the_frame_fits():
    assert choose_vae_tiling(WAN21_VAE, (90, 160), 80 * GIB)[0] is None
    tiling, peak = choose_vae_tiling(WAN21_VAE, (90, 160), 24 * GIB)
    assert tiling.overlap == 8  # 64 px at 8 px per latent pixel
    assert tiling.count(90, 160) == 2 and peak <= 24 * GIB * (1 - planner.ALLOCATOR_SLACK_FRACTION)
    smaller, _ = choose_vae_tiling(WAN21_VAE, (90, 160), 12 * GIB)
    assert smaller.count(90, 160) > 2


def test_quantizing_at_load_counts_the_bf16_expert_and_suggests_a_quantized_folder():
    plan = make_plan(get_task("t2v-A14B"), "832*480", 81, "fp8", vram_gib=16, ram_gib=28, quantize_at_load=True)
    assert not plan.fits
    assert plan.peak_host_ram >= dit_bytes(get_task("t2v-A14B").dit, Precision.BF16).total
    assert plan.remedy.startswith("experts from `wanrt quantize`")


def test_nothing_fits_is_said_plainly():
    plan = make_plan(get_task("t2v-A14B"), "832*480", 81, "fp8", vram_gib=4, ram_gib=8)
    assert not plan.fits and plan.remedy is None
    with pytest.raises(InputError, match="nothing tried fits this machine"):
        require_fit(plan)


def test_t2v_takes_any_patch_multiple_size_and_smaller_sizes_are_real_advice():
    result = CliRunner().invoke(app, ["plan", "--task", "t2v-A14B", "--size", "640*368", "--vram", "24"])
    assert result.exit_code == 0, result.output
    plan = make_plan(get_task("t2v-A14B"), "832*480", 161, "fp8", vram_gib=12, ram_gib=32)
    assert not plan.fits and plan.remedy is not None
    bad = CliRunner().invoke(app, ["plan", "--task", "t2v-A14B", "--size", "650*368"])
    assert bad.exit_code == 2 and "multiples of 16" in bad.stderr
