"""Running built artifacts (AOTInductor packages, TensorRT engines) in place of an expert's
forward and of the VAE's causal steps.

`ArtifactEngine` is shared by every artifact backend; a backend subclass only says how to
`load` a verified artifact folder into a callable taking the spec's inputs positionally and
returning its outputs. For each call the engine finds the artifact whose manifest matches
this model, precision, device and input shapes (built on first use in the cache, or read from
a `wanrt export` folder), loads it once and reuses it.

The expert runs as pre -> blocks -> post (`StagedExpert`). Each block keeps its `__call__`
and only its `forward` is replaced, by a call to the shared DIT_BLOCK artifact with that
block's current tensors: the block streamer's pre-hook binds the streamed weights before the
call and releases them after, so streaming composes unchanged. Per-token timesteps (ti2v
with an image) run the per-token variants of the DiT graphs, and the first causal VAE step
its own graph. What the specs do not cover runs eagerly: padded sequences (sequence
parallelism), text longer than the model's text length, non-float32 VAE inputs.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.engines.base import Engine, EngineOptions
from wanrt.export.build import Backend, artifact_identity, build_artifact, require_backend
from wanrt.export.manifest import (ArtifactStore, Identity, Manifest, MissingArtifactError,
                                   StaleArtifactError)
from wanrt.export.specs import Component, ExportSpec, block_tensor_names, make_spec, vae_step_component
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import DiTBlock, DiTInputs, WanDiT, rope_tables
from wanrt.models.vae import WanVAE

log = logging.getLogger("wanrt.engines")

ArtifactRunner = Callable[..., Sequence[Tensor]]


class ArtifactEngine(Engine):
    """Finds, builds (cache mode) and loads artifacts of `backend`; subclasses implement `load`."""

    backend: Backend

    def __init__(self, options: EngineOptions, reason: str = "", missing_runs_eager: bool = False) -> None:
        super().__init__(options, reason)
        self.backend_version = require_backend(self.backend, options.device)
        exported = options.engine_dir is not None
        hint = (f"export it with `wanrt export --backend {self.backend.value} --out {options.engine_dir}` "
                "for this run's sizes, frame counts and precision") if exported else "it will be rebuilt"
        self.store = ArtifactStore(options.cache_dir, build=not exported,
                                   max_bytes=None if exported else options.cache_bytes, rebuild_hint=hint)
        # True for `auto`, which found artifacts but cannot know they cover this run.
        self.missing_runs_eager = missing_runs_eager
        self.eager_components: set[str] = set()
        self._identities: dict[tuple[Component, int], tuple[Identity, str]] = {}
        self._runners: dict[tuple, ArtifactRunner | None] = {}

    def load(self, directory: Path, manifest: Manifest, spec: ExportSpec) -> ArtifactRunner:
        """Deserialize the artifact in `directory`, already verified against its manifest."""
        raise NotImplementedError

    def describe(self) -> str:
        where = "exported folder" if self.options.engine_dir is not None else "cache, built on first use"
        text = f"{self.kind.value} ({self.backend.value} {self.backend_version}; {where} {self.store.root})"
        return f"{text}; {self.reason}" if self.reason else text

    # ------------------------------------------------------------------ lookup

    def _identity(self, component: Component, model: nn.Module) -> tuple[Identity, str]:
        """The identity and its slot, once per model, not per call: hashing baked-in weights
        reads them, and the blocks look their runner up 80 times per step."""
        key = (component, id(model))
        if key not in self._identities:
            identity = artifact_identity(component, self.backend, model, self.options.device,
                                         self.options.precision, self.backend_version)
            self._identities[key] = identity, identity.slot()
        return self._identities[key]

    def runner(self, component: Component, model: nn.Module, inputs: Sequence[Tensor],
               grid: tuple[int, int, int], per_token_timesteps: bool = False) -> ArtifactRunner | None:
        """The artifact runner for these inputs (`grid` = latent frames, rows, cols), or None
        when this component runs eagerly (not exported, with `missing_runs_eager`)."""
        identity, slot = self._identity(component, model)
        key = (slot, tuple(t.shape for t in inputs))
        if key not in self._runners:
            self._runners[key] = self._resolve(component, model, identity, grid, per_token_timesteps)
        return self._runners[key]

    def _resolve(self, component: Component, model: nn.Module, identity: Identity,
                 grid: tuple[int, int, int], per_token_timesteps: bool) -> ArtifactRunner | None:
        task = self.options.task
        stride_t, stride_h, stride_w = task.vae_stride
        frames, rows, cols = grid
        spec = make_spec(component, model, task, [f"{cols * stride_w}*{rows * stride_h}"],
                         [(frames - 1) * stride_t + 1], per_token_timesteps)
        def announce() -> None:  # a build takes minutes at full size: say what is happening
            log.warning("building %s %s for %s in %s (first use; reused afterwards)", self.backend.value,
                        component.value, spec.profiles[0].name, self.store.root)
        try:
            directory, manifest = build_artifact(self.store, spec, self.backend, model, self.options.device,
                                                 self.options.precision, identity, on_build=announce)
        except (MissingArtifactError, StaleArtifactError):
            if not self.missing_runs_eager:
                raise
            self.eager_components.add(component.value)
            log.warning("%s: no matching %s artifact in %s; it runs eagerly", component.value,
                        self.backend.value, self.store.root)
            return None
        return self.load(directory, manifest, spec)

    # ------------------------------------------------------------------ hooks

    def wrap_expert(self, expert: Expert, model: WanDiT) -> "StagedExpert":
        return StagedExpert(self, model)

    def prepare_vae(self, vae: WanVAE) -> None:
        # Instance attributes: `iter_decode` and `encode` call these for every causal step.
        vae.decode_step = functools.partial(self._vae_step, vae, True)
        vae.encode_step = functools.partial(self._vae_step, vae, False)

    def _vae_step(self, vae: WanVAE, decode: bool, x: Tensor,
                  cache: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        eager = WanVAE.decode_step if decode else WanVAE.encode_step
        first = cache is None
        # A first step of several frames is refused by the eager step, with its message.
        if x.dtype != torch.float32 or (first and x.shape[2] != 1):
            return eager(vae, x, cache)
        _, spatial, _ = vae.config.stride
        rows, cols = x.shape[3:] if decode else (x.shape[3] // spatial, x.shape[4] // spatial)
        inputs = [x, *(cache or [])]
        run = self.runner(vae_step_component(decode, first), vae, inputs, (1, rows, cols))
        if run is None:
            return eager(vae, x, cache)
        outputs = run(*(t.contiguous() for t in inputs))
        return outputs[0], list(outputs[1:])


def _tensor_getters(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of each DIT_BLOCK weight input, read at call time: the streamer
    re-points `.data` and `.to()` replaces buffers, so tensor objects cannot be cached."""
    getters = []
    for name in block_tensor_names(block):
        owner, _, attribute = name.rpartition(".")
        getters.append((block.get_submodule(owner), attribute))
    return getters


class StagedExpert:
    """An expert's forward as pre -> blocks -> post, each through its artifact (or eagerly)."""

    def __init__(self, engine: ArtifactEngine, model: WanDiT) -> None:
        self.engine = engine
        self.model = model
        self._rope: dict[tuple, tuple[Tensor, Tensor]] = {}
        for block in getattr(model, model.repeated_blocks):
            block.forward = functools.partial(self._block_forward, block, _tensor_getters(block))

    def __call__(self, latents: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        model = self.model
        inputs = self._embed(latents, timestep, context, y)
        tokens = inputs.tokens
        for block in getattr(model, model.repeated_blocks):
            tokens = model.run_block(block, tokens, inputs)
        return self._unembed(tokens, inputs, tuple(latents.shape[2:]))

    def _rope_tables(self, grid: tuple[int, int, int], seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (grid, seq_len, device)
        if key not in self._rope:
            self._rope[key] = rope_tables(grid, self.model.config.head_dim, seq_len, device=device)
        return self._rope[key]

    def _embed(self, latents: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None) -> DiTInputs:
        model, cfg = self.model, self.model.config
        _, patch_h, patch_w = cfg.patch_size
        frames, rows, cols = latents.shape[2:]
        grid = (frames, rows // patch_h, cols // patch_w)
        # One timestep `[1]`, or one per video token `[1, tokens]` (ti2v with an image).
        if timestep.shape not in ((1,), (1, math.prod(grid))) or context.shape[1] > cfg.text_len:
            return model.embed(latents, timestep, context, y)
        # embed zero-pads the text to text_len itself; the artifact takes it padded.
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        # The sinusoid is float64 math, done here: the graph takes its float32 result.
        inputs = [latents, model.time_sinusoid(timestep), context] + ([y] if y is not None else [])
        run = self.engine.runner(Component.DIT_PRE, model, inputs, tuple(latents.shape[2:]),
                                 per_token_timesteps=timestep.dim() == 2)
        if run is None:
            return model.embed(latents, timestep, context, y)
        tokens, time_emb, time_mod, context_emb = run(*(t.contiguous() for t in inputs))
        rope_cos, rope_sin = self._rope_tables(grid, tokens.shape[1], latents.device)
        return DiTInputs(tokens, time_emb, time_mod, context_emb, rope_cos, rope_sin, None, grid)

    def _block_forward(self, block: DiTBlock, getters: list[tuple[nn.Module, str]], x: Tensor,
                       time_mod: Tensor, context: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                       key_mask: Tensor | None = None) -> Tensor:
        if key_mask is None and time_mod.shape[1] in (1, x.shape[1]):
            inputs = [x, time_mod, context, rope_cos, rope_sin, *(getattr(m, a) for m, a in getters)]
            run = self.engine.runner(Component.DIT_BLOCK, block, inputs, self._token_grid(x.shape[1]),
                                     per_token_timesteps=time_mod.shape[1] != 1)
            if run is not None:
                return run(*(t.contiguous() for t in inputs))[0]
        return DiTBlock.forward(block, x, time_mod, context, rope_cos, rope_sin, key_mask)

    def _token_grid(self, tokens: int) -> tuple[int, int, int]:
        """A latent grid of `tokens` patches: the block depends on the token count alone, so
        runs of any grid with the same count share one block artifact."""
        _, patch_h, patch_w = self.model.config.patch_size
        return 1, patch_h, tokens * patch_w

    def _unembed(self, tokens: Tensor, inputs: DiTInputs, latent_grid: tuple[int, int, int]) -> Tensor:
        if inputs.time_emb.shape[1] not in (1, tokens.shape[1]):
            return self.model.unembed(tokens, inputs)
        # Only the shape of `grid` is read: it tells the graph how to unpatchify.
        carrier = torch.empty(inputs.grid, device=tokens.device)
        run_inputs = [tokens, inputs.time_emb, carrier]
        run = self.engine.runner(Component.DIT_POST, self.model, run_inputs, latent_grid,
                                 per_token_timesteps=inputs.time_emb.shape[1] != 1)
        if run is None:
            return self.model.unembed(tokens, inputs)
        return run(*(t.contiguous() for t in run_inputs))[0]
