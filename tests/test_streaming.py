"""Block streaming gives the same outputs as resident execution, and moves only what the
execution order needs (CPU: same bookkeeping, synchronous copies)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FIXTURES
from wanrt.loading.checkpoint import load_dit
from wanrt.runtime.streaming import ALIGNMENT, BlockStreamer, block_layout


@pytest.fixture(scope="module")
def experts():
    return {name: copy.deepcopy(load_dit(FIXTURES / f"dit/t2v/{name}_noise_model"))
            for name in ("high", "low")}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 4, 6, generator=g), torch.tensor([937]),
            torch.randn(1, 7, 4096, generator=g))


def _block_bytes(model) -> int:
    return block_layout(model.blocks[0])[1]


@pytest.mark.parametrize("depth,resident", [(1, 0), (2, 0), (1, 1), (3, 1)])
def test_streamed_forward_equals_resident(experts, depth, resident):
    reference = experts["high"]
    streamed = copy.deepcopy(reference)
    streamer = BlockStreamer("cpu", depth=depth)
    streamer.register("high", streamed, resident_blocks=resident)
    x, t, context = _inputs()
    with torch.no_grad():
        expected = reference(x, t, context)
        for _ in range(3):  # consecutive forwards reuse the slots
            streamer.expect_forward("high")
            assert torch.equal(streamed(x, t, context), expected)
    assert streamer.bytes_copied == 3 * (2 - resident) * _block_bytes(reference)


def test_unannounced_forward_still_runs_correctly(experts):
    reference = experts["low"]
    streamed = copy.deepcopy(reference)
    streamer = BlockStreamer("cpu", depth=1)
    streamer.register("low", streamed)
    x, t, context = _inputs(1)
    with torch.no_grad():
        assert torch.equal(streamed(x, t, context), reference(x, t, context))


def test_moe_order_crosses_the_boundary_and_skips_unused_experts(experts):
    high, low = copy.deepcopy(experts["high"]), copy.deepcopy(experts["low"])
    streamer = BlockStreamer("cpu", depth=2)
    streamer.register("high", high)
    streamer.register("low", low)
    x, t, context = _inputs(2)
    # Two steps of CFG on the high-noise expert, then one on the low-noise one, announced
    # up front: when the last high-noise block starts, the low-noise block 0 is already in.
    order = ["high"] * 4 + ["low"] * 2
    for key in order:
        streamer.expect_forward(key)
    loaded_when_last_high_block_ran = []
    high.blocks[1].register_forward_pre_hook(
        lambda *_: loaded_when_last_high_block_ran.append(set(streamer._loaded)))
    with torch.no_grad():
        outputs = [(high if key == "high" else low)(x, t, context) for key in order]
    assert ("low", 0) in loaded_when_last_high_block_ran[-1]
    assert torch.equal(outputs[0], experts["high"](x, t, context))
    assert torch.equal(outputs[-1], experts["low"](x, t, context))
    assert streamer.bytes_copied == len(order) * 2 * _block_bytes(high)

    only_high = BlockStreamer("cpu", depth=2)
    only_high.register("high", copy.deepcopy(experts["high"]))
    only_high.register("low", copy.deepcopy(experts["low"]))
    only_high.expect_forward("high")
    assert all(key[0] == "high" for key in only_high._loaded)


def test_block_layout_is_aligned_and_covers_every_tensor(experts):
    block = experts["high"].blocks[0]
    layout, total = block_layout(block)
    assert len(layout) == len(list(block.parameters())) + len(list(block.buffers()))
    assert all(entry.offset % ALIGNMENT == 0 for entry in layout)
    assert total >= sum(p.numel() * p.element_size() for p in block.parameters())
