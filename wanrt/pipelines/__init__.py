"""Sampling pipelines, one module per task family over a shared core.

- `core`: the step loop, guidance, noise, memory/streaming settings (every family);
- `video`: text/image-to-video (t2v-A14B, i2v-A14B, ti2v-5B);
- `s2v`: speech-to-video (s2v-14B), `S2VPipeline` over `video.Pipeline`'s components.
"""

from wanrt.pipelines.core import (Guidance, MemoryBudget, NonFiniteLatentsError, StepInfo, StreamingConfig,
                                  TextEmbeddings, noise_for, run_steps)
from wanrt.pipelines.video import (GenerationRequest, Pipeline, ResolvedRequest, SamplingState,
                                   best_output_size, i2v_latent_hw, latent_grid, output_size)

__all__ = [
    "GenerationRequest", "Guidance", "MemoryBudget", "NonFiniteLatentsError", "Pipeline", "ResolvedRequest",
    "SamplingState", "StepInfo", "StreamingConfig", "TextEmbeddings", "best_output_size", "i2v_latent_hw",
    "latent_grid", "noise_for", "output_size", "run_steps",
]
