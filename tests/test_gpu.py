"""The same DiT parity on a CUDA device (skipped, with the reason, on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, assert_parity, load_fixture

from wanrt.loading.checkpoint import load_dit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def exact_float32_matmul():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("variant,folder,out_key,t_key,y_key", [
    ("t2v", "dit/t2v/high_noise_model", "g1.t2v.high_noise_model.scalar_t.out", "t_scalar", None),
    ("i2v", "dit/i2v/low_noise_model", "g1.i2v.low_noise_model.scalar_t.out", "t_scalar", "g1.y"),
    ("ti2v", "dit/ti2v", "g1.per_token_t.out", "g1.t_per_token", None),
])
def test_dit_parity_on_cuda(variant, folder, out_key, t_key, y_key, exact_float32_matmul):
    tensors, _ = load_fixture(f"dit/forward_{variant}")
    device = torch.device("cuda")
    model = load_dit(FIXTURES / folder).to(device)
    x = tensors["g1.x"][None].to(device)
    y = tensors[y_key][None].to(device) if y_key else None
    t = tensors[t_key].to(device)
    context = tensors["context"][None].to(device)
    with torch.no_grad():
        out = model(x, t, context, y=y).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = model(x, t, context, y=y).cpu()
    assert_parity(out[0], tensors[out_key], f"{variant} cuda float32")
    # bf16 attention/linears: the fixture README puts GPU numerics at ~4e-3 of |out| ~4.
    assert_parity(out_bf16[0], tensors[out_key], f"{variant} cuda bf16", rtol=2e-2)


def test_streamed_generation_equals_resident_on_cuda(tmp_path):
    """The copy stream, events and slots on a real device: same latents, bit for bit."""
    from wanrt.configs import get_task
    from wanrt.demo import write_tiny_checkpoint
    from wanrt.loading.checkpoint import locate_checkpoint
    from wanrt.pipelines import GenerationRequest, Pipeline, StreamingConfig, TextEmbeddings

    task = get_task("tiny-t2v")
    root = write_tiny_checkpoint(tmp_path / "tiny", task)
    generator = torch.Generator().manual_seed(0)
    embeddings = TextEmbeddings(torch.randn(5, 32, generator=generator), torch.randn(9, 32, generator=generator))
    request = GenerationRequest(prompt="", steps=6, seed=3)
    results = []
    for streaming in (None, StreamingConfig(resident_blocks=0, depth=1), StreamingConfig(1, 2)):
        pipeline = Pipeline(task, locate_checkpoint(root, task), torch.device("cuda"), torch.bfloat16,
                            streaming=streaming)
        results.append(pipeline.sample(request, embeddings=embeddings))
        if streaming is not None:
            assert pipeline._streamer.pin and pipeline._streamer.bytes_copied > 0
    assert torch.equal(results[1], results[0]) and torch.equal(results[2], results[0])


def test_partial_pinning_keeps_results_and_pins_up_to_the_limit():
    import copy

    from wanrt.runtime.streaming import BlockStreamer, block_layout

    reference = copy.deepcopy(load_dit(FIXTURES / "dit/t2v/high_noise_model")).cuda()
    block_bytes = block_layout(reference.blocks[0])[1]
    streamed = copy.deepcopy(reference).cpu()
    streamer = BlockStreamer("cuda", depth=1, pin_limit_bytes=int(1.5 * block_bytes))
    streamer.register("high", streamed)
    streamer.move_resident("high", "cuda")
    assert [b.pinned for b in streamer._blocks.values()] == [True, False]
    assert streamer.pinned_bytes == block_bytes
    tensors, _ = load_fixture("dit/forward_t2v")
    x, t, context = (tensors["g1.x"][None].cuda(), tensors["t_scalar"].cuda(), tensors["context"][None].cuda())
    with torch.no_grad():
        expected = reference(x, t, context)
        for _ in range(2):
            streamer.expect_forward("high")
            assert torch.equal(streamed(x, t, context), expected)


def test_fp8_experts_stream_and_run_scaled_mm_on_cuda(tmp_path):
    """Quantized blocks pack into the streamer's byte slots like bf16 ones."""
    import dataclasses

    from wanrt.configs import get_task
    from wanrt.demo import write_tiny_checkpoint
    from wanrt.export.quantize import Kernel, QuantizedLinear
    from wanrt.loading.checkpoint import Expert, locate_checkpoint
    from wanrt.pipelines import GenerationRequest, Pipeline, StreamingConfig, TextEmbeddings

    tiny = get_task("tiny-t2v")
    task = dataclasses.replace(tiny, dit=dataclasses.replace(tiny.dit, num_layers=4))
    files = locate_checkpoint(write_tiny_checkpoint(tmp_path / "four_blocks", task), task)
    generator = torch.Generator().manual_seed(0)
    embeddings = TextEmbeddings(torch.randn(5, 32, generator=generator), torch.randn(9, 32, generator=generator))
    request = GenerationRequest(prompt="", steps=4, seed=3)
    cuda = torch.device("cuda")
    reference = Pipeline(task, files, cuda, torch.bfloat16).sample(request, embeddings=embeddings)
    resident = Pipeline(task, files, cuda, torch.bfloat16, precision="fp8")
    streamed = Pipeline(task, files, cuda, torch.bfloat16, precision="fp8",
                        streaming=StreamingConfig(resident_blocks=1, depth=1))
    latents = resident.sample(request, embeddings=embeddings)
    assert torch.equal(streamed.sample(request, embeddings=embeddings), latents)
    kernels = {m.kernel_for(cuda) for m in resident.dit(Expert.LOW_NOISE).modules()
               if isinstance(m, QuantizedLinear)}
    assert kernels == {Kernel.SCALED_MM}
    error = ((latents - reference).norm() / reference.norm()).item()
    assert 0 < error <= 5e-2, error
