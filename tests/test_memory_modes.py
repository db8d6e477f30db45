"""Issue 17 in the pipeline: one A14B expert in host RAM at a time (freed at the boundary,
identical latents), the planner's VAE tiling as the pipeline's decode/encode, and the tiny
preview VAE through `wanrt generate --vae tiny` (recorded in the sidecar)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import save_file
from test_tiny_vae import published_state
from typer.testing import CliRunner

from wanrt.cli.app import app
from wanrt.cli.preview import RuntimeOptions
from wanrt.loading.checkpoint import Expert
from wanrt.loading.tiny_vae import VAEKind
from wanrt.pipelines import GenerationRequest, Pipeline, TextEmbeddings
from wanrt.pipelines.core import StreamingConfig
from wanrt.runtime.planner import Precision, RamMode
from wanrt.runtime.vae_tiling import VAETiling

REQUEST = GenerationRequest(prompt="", size="64*64", frame_num=1, steps=6, seed=3)


def _embeddings() -> TextEmbeddings:
    generator = torch.Generator().manual_seed(5)
    return TextEmbeddings(torch.randn(7, 32, generator=generator), torch.randn(11, 32, generator=generator))


@pytest.fixture(scope="module")
def reference_latents(checkpoints) -> torch.Tensor:
    """Both experts held for the whole run: what every RAM mode must reproduce exactly."""
    return Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu").sample(
        REQUEST, embeddings=_embeddings())


def _held_bytes(pipeline: Pipeline) -> dict[Expert, int]:
    """Bytes of distinct storages behind each expert the pipeline still holds (the streamer's
    host block buffers included)."""
    held = {}
    for expert, model in pipeline._experts.items():
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*model.parameters(), *model.buffers()]}
        if pipeline._streamer is not None:
            storages.update({b.host.untyped_storage().data_ptr(): b.host.untyped_storage().nbytes()
                             for key, b in pipeline._streamer._blocks.items() if key[0] is expert})
        held[expert] = sum(storages.values())
    return held


@pytest.mark.parametrize("streamed", [False, True])
def test_one_expert_at_a_time_frees_the_high_noise_expert_and_keeps_the_latents(checkpoints, reference_latents,
                                                                                  streamed):
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    pipeline.ram_mode = RamMode.ONE_EXPERT
    if streamed:
        pipeline.streaming = StreamingConfig(resident_blocks=1, depth=1)
    seen: list[tuple[Expert, dict[Expert, int]]] = []
    high_noise: list[weakref.ref] = []

    def on_step(info) -> None:
        if info.expert is Expert.HIGH_NOISE and not high_noise:
            model = pipeline._experts[Expert.HIGH_NOISE]
            high_noise.extend([weakref.ref(model), weakref.ref(next(model.parameters()))])
        gc.collect()
        seen.append((info.expert, _held_bytes(pipeline)))
    latents = pipeline.sample(REQUEST, embeddings=_embeddings(), on_step=on_step)

    assert torch.equal(latents, reference_latents)
    assert [e for e, _ in seen].count(Expert.HIGH_NOISE) and [e for e, _ in seen].count(Expert.LOW_NOISE)
    expert_bytes = max(next(iter(held.values())) for _, held in seen)
    for expert, held in seen:
        # Only the running expert is held, never both.
        assert list(held) == [expert] and held[expert] == expert_bytes
    # After the boundary the high-noise model and its weights are gone, not just unreferenced here.
    assert all(ref() is None for ref in high_noise)
    if streamed:
        assert all(key[0] is Expert.LOW_NOISE for key in pipeline._streamer._blocks)


def test_one_expert_mode_frees_t5_after_encoding(checkpoints):
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    pipeline.ram_mode = RamMode.ONE_EXPERT
    pipeline.encode_text("a cat", "blurry")
    assert pipeline._text_encoder is None


def test_the_pipeline_decodes_through_the_plans_tiling(checkpoints):
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    latents = torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    whole = pipeline.decode(latents)
    pipeline.vae_tiling = VAETiling(6, 6, 0)  # one tile covering the frame
    assert torch.equal(pipeline.decode(latents), whole)
    pipeline.vae_tiling = VAETiling(4, 4, 2)
    tiled = pipeline.decode(latents)
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    assert pipeline.decode_record() == {"vae": "full", "tiling": {"tile_height": 4, "tile_width": 4, "overlap": 2}}


def test_generate_with_the_tiny_vae_says_so_in_the_sidecar(checkpoints, tmp_path, cache_dir):
    tiny = tmp_path / "taew2_1.pth"
    torch.save(published_state(16, 1), tiny)
    out = tmp_path / "v.mp4"
    result = CliRunner().invoke(app, [
        "generate", "--task", "tiny-t2v", "--ckpt-dir", str(checkpoints["tiny-t2v"]), "--prompt", "a dog",
        "--steps", "2", "--seed", "1", "--frame-num", "5", "--no-embedding-cache", "--vae", "tiny",
        "--tiny-vae", str(tiny), "--output", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["decode"] == {"vae": "tiny", "file": str(tiny)}
    assert sidecar["video"]["frames"] == 5
    missing = CliRunner().invoke(app, [
        "generate", "--task", "tiny-t2v", "--ckpt-dir", str(checkpoints["tiny-t2v"]), "--prompt", "a dog",
        "--vae", "tiny", "--output", str(tmp_path / "w.mp4")])
    assert missing.exit_code == 2 and "no taew2_1.pth in" in missing.stderr


def test_stream_file_reads_streamed_blocks_from_the_checkpoint_and_keeps_the_latents(checkpoints,
                                                                                     reference_latents):
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    pipeline.ram_mode = RamMode.STREAM_FILE
    pipeline.streaming = StreamingConfig(resident_blocks=1, depth=1)
    seen = []

    def on_step(info) -> None:
        model = pipeline._experts[info.expert]
        # Between turns the streamed block holds no weights at all; the resident one does.
        seen.append((all(p.untyped_storage().nbytes() <= p.element_size() for p in model.blocks[1].parameters()),
                     not any(p.is_meta for p in model.blocks[0].parameters()), list(pipeline._experts)))
    latents = pipeline.sample(REQUEST, embeddings=_embeddings(), on_step=on_step)
    assert torch.equal(latents, reference_latents)
    assert all(streamed_empty and resident_loaded and len(held) == 1 for streamed_empty, resident_loaded, held in seen)
    block_bytes = sum(p.numel() * p.element_size() for p in pipeline._experts[Expert.LOW_NOISE].blocks[1].parameters())
    # Every forward (2 per step, CFG) read the streamed block from the file.
    assert pipeline._streamer._reader.bytes_read == 2 * REQUEST.steps * block_bytes


def test_preview_runtime_options_load_the_tiny_vae(checkpoints, tmp_path):
    tiny = tmp_path / "taew2_1.safetensors"
    save_file(published_state(16, 1), str(tiny))
    options = RuntimeOptions("cpu", None, False, None, None, Precision.BF16, VAEKind.TINY, tiny)
    pipeline = options.load_pipeline(checkpoints["tiny-t2v"], "tiny-t2v")
    assert pipeline.decode_record() == {"vae": "tiny", "file": str(tiny)}
    video = pipeline.decode(torch.randn(16, 2, 2, 2))
    assert video.shape == (3, 5, 16, 16) and video.abs().max() <= 1


def test_i2v_conditioning_encodes_through_the_tiling(checkpoints):
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-i2v"], "tiny-i2v", device="cpu")
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    whole = pipeline._i2v_condition(image, 5, 6, 6)
    pipeline.vae_tiling = VAETiling(6, 6, 0)
    assert torch.equal(pipeline._i2v_condition(image, 5, 6, 6), whole)
    pipeline.vae_tiling = VAETiling(4, 4, 2)
    tiled = pipeline._i2v_condition(image, 5, 6, 6)
    # The mask channels are exact; the encoded image differs only by the seams.
    assert torch.equal(tiled[:, :4], whole[:, :4]) and not torch.equal(tiled, whole)
