"""The Wan2.2 S2V-14B DiT (official `WanModel_S2V` semantics), plain PyTorch.

On top of the Wan DiT (`wanrt.models.dit`, whose attention, RoPE, norms, embeddings and head
it reuses) the speech-to-video model adds:
- a token sequence `[x | ref | motion]`: the noisy latents (plus the pose latents through
  `cond_encoder`), the reference image latents through the same `patch_embedding`, and the
  FramePack motion tokens of the previous clip's last latents at 1x/2x/4x compression;
- a learned embedding of each token's kind (0 x, 1 ref, 2 motion) added to every token;
- per-token RoPE positions: ref at frame 30, motion at negative frames (see `token_positions`);
- two time signals: x tokens are modulated with t, ref and motion tokens with t = 0;
- audio injection after the listed blocks, on x tokens only and frame by frame: an AdaIN
  (LayerNorm modulated by the clip-level audio feature) then cross-attention from the
  frame's tokens to that frame's audio tokens, added back.
Parameter names are the official ones (including `casual_audio_encoder`), so the official
checkpoint loads with an identity key map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.configs import DiTConfig, S2VConfig
from wanrt.models.dit import CrossAttention, DiTBlock, WanDiT, float32_region, rope_angles

# Frames the FramePack packer reads, newest last: 1 at full size, 2 at 2x, 16 at 4x.
FRAME_PACK_BUCKETS = (1, 2, 16)
# RoPE frame index of the reference image tokens (the official model's choice).
REF_FRAME_POSITION = 30
AUDIO_NORM_EPS = 1e-6
ADAIN_EPS = 1e-5  # diffusers' AdaLayerNorm default, which the official injector uses


def _plain_layer_norm(x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class CausalConv1d(nn.Module):
    """Conv1d over time, left-padded by replicating the first frame (official `CausalConv1d`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


class AudioFrameEncoder(nn.Module):
    """Audio features `[B, T, C]` -> per-frame tokens at a quarter of the frame rate
    (official `MotionEncoder_tc`): `num_token` local tokens plus a learned padding token,
    and one global token. conv2/conv3 and their norms are shared by both branches."""

    def __init__(self, in_dim: int, hidden_dim: int, num_token: int) -> None:
        super().__init__()
        self.num_token = num_token
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_token)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _downsample(self, x: Tensor) -> Tensor:
        """`[N, T, C/4]` after conv1 -> LN, SiLU, conv2 (stride 2), LN, SiLU, conv3 (stride 2),
        LN, SiLU -> `[N, T/4, C]`."""
        x = F.silu(_plain_layer_norm(x, AUDIO_NORM_EPS))
        for conv in (self.conv2, self.conv3):
            x = F.silu(_plain_layer_norm(conv(x.transpose(1, 2)).transpose(1, 2), AUDIO_NORM_EPS))
        return x

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(global `[B, T', 1, C]`, local `[B, T', num_token + 1, C]`)."""
        batch = features.shape[0]
        channels_first = features.transpose(1, 2)
        local = self.conv1_local(channels_first)
        # Channels are group-major: token n owns channels [n*C/4, (n+1)*C/4).
        local = local.unflatten(1, (self.num_token, -1)).flatten(0, 1).transpose(1, 2)
        local = self._downsample(local).unflatten(0, (batch, self.num_token)).transpose(1, 2)
        padding = self.padding_tokens.expand(batch, local.shape[1], 1, -1)
        local = torch.cat([local, padding], dim=2)
        global_ = self._downsample(self.conv1_global(channels_first).transpose(1, 2))
        return self.final_linear(global_)[:, :, None], local


class CausalAudioEncoder(nn.Module):
    """The wav2vec2 layers `[B, L, C, T]` mixed by softmax-free learned weights
    `silu(w_l) / sum silu(w)`, then `AudioFrameEncoder` (official `CausalAudioEncoder`)."""

    def __init__(self, audio_dim: int, out_dim: int, num_token: int, num_layers: int = 25) -> None:
        super().__init__()
        self.encoder = AudioFrameEncoder(audio_dim, out_dim, num_token)
        self.weights = nn.Parameter(torch.ones(1, num_layers, 1, 1))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        with float32_region(features.device):
            weights = F.silu(self.weights.float())
            mixed = (features.float() * weights / weights.sum(dim=1, keepdim=True)).sum(dim=1)
            return self.encoder(mixed.transpose(1, 2))


class AudioAdaNorm(nn.Module):
    """diffusers `AdaLayerNorm(chunk_dim=1)`: `LN(x)(1 + scale) + shift`, with
    `[shift, scale] = Linear(SiLU(emb))`, shift first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)
        return _plain_layer_norm(x, ADAIN_EPS) * (1 + scale[:, None]) + shift[:, None]


def injector_slots(inject_layers: tuple[int, ...], num_layers: int) -> tuple[dict[int, int], int]:
    """(block index -> audio injector index, number of injectors), as the official
    `AudioInjector_WAN` assigns them.

    The official code matches `f'transformer_blocks.{layer}'` as a substring of each block's
    module name, i.e. the block number's decimal digits start with the layer's; injectors
    are numbered in block order. For the released layer lists this is the identity on the
    listed layers; it is reproduced so that any list builds the official modules."""
    slots: dict[int, int] = {}
    count = 0
    for block in range(num_layers):
        for layer in inject_layers:
            if str(block).startswith(str(layer)):
                slots[layer] = count
                count += 1
    return slots, count


class AudioInjector(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, num_injectors: int) -> None:
        super().__init__()
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps, qk_norm=True)
                                      for _ in range(num_injectors))
        self.injector_adain_layers = nn.ModuleList(AudioAdaNorm(dim) for _ in range(num_injectors))


class FramePacker(nn.Module):
    """Motion latents -> tokens (official `FramePackMotioner`, 'padd' mode): the newest 19
    latent frames (right-aligned in a zero buffer) patchified as 1 frame at (1,2,2), the 2
    before at (2,4,4) and the 16 before those at (4,8,8); tokens ordered 1x, 2x, 4x."""

    def __init__(self, latent_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(latent_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(latent_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(latent_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: Tensor, add_last_motion: bool = True) -> Tensor:
        """`[B, C, T, H, W]` -> `[B, N, dim]`."""
        window = sum(FRAME_PACK_BUCKETS)
        packed = motion.new_zeros(*motion.shape[:2], window, *motion.shape[3:])
        overlap = min(window, motion.shape[2])
        if overlap:
            packed[:, :, -overlap:] = motion[:, :, -overlap:]
        if not add_last_motion:
            # Official `add_last_motion=0` in 'padd' mode: the 1x and 2x frames are zeroed.
            packed[:, :, -sum(FRAME_PACK_BUCKETS[:2]):] = 0
        far, near, newest = packed.split(FRAME_PACK_BUCKETS[::-1], dim=2)
        return torch.cat([proj(frames).flatten(2).transpose(1, 2) for proj, frames in
                          ((self.proj, newest), (self.proj_2x, near), (self.proj_4x, far))], dim=1)


def _axis_positions(start: int, count: int, span: int) -> Tensor:
    """`count` integer positions spread over `span` from `start` (official `rope_precompute`:
    `np.linspace(...).astype(int)`, mirrored for negative starts)."""
    if start >= 0:
        return torch.from_numpy(np.linspace(start, start + span - 1, count).astype(int))
    return -torch.from_numpy(np.linspace(-start, -start - span + 1, count).astype(int))


def _grid_positions(start: tuple[int, int, int], count: tuple[int, int, int],
                    span: tuple[int, int, int]) -> Tensor:
    """`[prod(count), 3]` (f, h, w) positions of a token grid, f slowest."""
    axes = [_axis_positions(*args) for args in zip(start, count, span)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def token_positions(grid: tuple[int, int, int], with_motion: bool) -> Tensor:
    """RoPE positions `[L, 3]` of the `[x | ref | motion]` tokens for a patch grid (F, h, w).

    x: its grid; ref: frame 30 on its grid; 1x motion: frame -1; 2x: frame -3 on h/2 x w/2
    positions spread over the grid; 4x: frames -19, -14, -9, -4 on h/4 x w/4 positions."""
    frames, h, w = grid
    parts = [_grid_positions((0, 0, 0), grid, grid),
             _grid_positions((REF_FRAME_POSITION, 0, 0), (1, h, w), (1, h, w))]
    if with_motion:
        newest, near, far = FRAME_PACK_BUCKETS
        parts += [_grid_positions((-newest, 0, 0), (1, h, w), (newest, h, w)),
                  _grid_positions((-(newest + near), 0, 0), (1, h // 2, w // 2), (near, h, w)),
                  _grid_positions((-(newest + near + far), 0, 0), (far // 4, h // 4, w // 4), (far, h, w))]
    return torch.cat(parts)


class S2VBlock(DiTBlock):
    """A Wan block whose modulation differs between the first `num_x_tokens` tokens (t)
    and the rest (t = 0); `time_mod [B, 2, 6, dim]` holds both rows."""

    def forward(self, x: Tensor, time_mod: Tensor, num_x_tokens: int, context: Tensor,  # type: ignore[override]
                rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        mod = (self.modulation.float().unsqueeze(0) + time_mod).unbind(dim=2)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod
        sizes = (num_x_tokens, x.shape[1] - num_x_tokens)

        def modulate(tokens: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
            return torch.cat([part * (1 + scale[:, i:i + 1]) + shift[:, i:i + 1]
                              for i, part in enumerate(tokens.split(sizes, dim=1))], dim=1)

        def gated(tokens: Tensor, gate: Tensor) -> Tensor:
            return torch.cat([part * gate[:, i:i + 1] for i, part in enumerate(tokens.split(sizes, dim=1))], dim=1)

        y = self.self_attn(modulate(self.norm1(x).float(), scale_sa, shift_sa), rope_cos, rope_sin, None)
        x = x.float() + gated(y.float(), gate_sa)
        x = x + self.cross_attn(self.norm3(x), context).float()
        y = self.ffn(modulate(self.norm2(x).float(), scale_ff, shift_ff))
        return x + gated(y.float(), gate_ff)


@dataclass
class S2VInputs:
    """What the blocks, the audio injection and the head need, made once per forward."""

    tokens: Tensor            # [B, L, dim] float32: x | ref | motion
    num_x_tokens: int
    time_emb: Tensor          # [B, 1, dim] float32 (t), feeds the head
    time_mod: Tensor          # [B, 2, 6, dim] float32: row 0 for x (t), row 1 for the rest (0)
    context: Tensor           # [B, text_len, dim]
    rope_cos: Tensor          # [L, 1, head_dim/2] float32
    rope_sin: Tensor
    audio_tokens: Tensor      # [B, F, num_audio_token + 1, dim]
    audio_global: Tensor      # [B, F, 1, dim]
    grid: tuple[int, int, int]


class WanS2VDiT(WanDiT):
    """`WanModel_S2V` with the official parameter names."""

    block_class = S2VBlock
    keep_in_fp32 = WanDiT.keep_in_fp32 + ("casual_audio_encoder",)

    def __init__(self, config: DiTConfig, s2v: S2VConfig) -> None:
        super().__init__(config)
        self.s2v = s2v
        dim = config.dim
        self.cond_encoder = nn.Conv3d(s2v.cond_dim, dim, kernel_size=config.patch_size,
                                      stride=config.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(s2v.audio_dim, dim, s2v.num_audio_token)
        self.injector_of_block, num_injectors = injector_slots(s2v.audio_inject_layers, config.num_layers)
        self.audio_injector = AudioInjector(dim, config.num_heads, config.eps, num_injectors)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePacker(config.in_dim, dim)

    def embed_audio(self, audio: Tensor, motion_frames: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """wav2vec2 features `[B, 25, C, T]` of this clip -> (global, local) audio tokens per
        latent frame. The encoder is causal: it sees `motion_frames[0]` copies of the first
        frame before the clip, whose `motion_frames[1]` latent frames are then dropped."""
        prefix = audio[..., :1].expand(*audio.shape[:3], motion_frames[0])
        audio_global, audio_local = self.casual_audio_encoder(torch.cat([prefix, audio], dim=-1))
        return audio_global[:, motion_frames[1]:], audio_local[:, motion_frames[1]:]

    def embed_s2v(self, x: Tensor, timestep: Tensor, context: Tensor, ref_latents: Tensor,
                  motion_latents: Tensor, cond_states: Tensor, audio: Tensor,
                  motion_frames: tuple[int, int] = (17, 5), drop_motion_frames: bool = False) -> S2VInputs:
        """x, cond_states `[B, C, F, H, W]`; ref_latents `[B, C, 1, H, W]`; motion_latents
        `[B, C, T_m, H, W]`; timestep int64 `[B]`; context `[B, Lc, text_dim]`; audio
        `[B, 25, C_a, 4F]` (four audio frames per latent frame)."""
        batch = x.shape[0]
        video = self.patch_embedding(x) + self.cond_encoder(cond_states)
        grid = tuple(video.shape[2:])
        parts = [video.flatten(2).transpose(1, 2), self.patch_embedding(ref_latents).flatten(2).transpose(1, 2)]
        if not drop_motion_frames:
            parts.append(self.frame_packer(motion_latents, self.s2v.add_last_motion))
        kinds = torch.cat([torch.full((part.shape[1],), kind, dtype=torch.long, device=x.device)
                           for kind, part in enumerate(parts)])
        tokens = torch.cat(parts, dim=1).float() + self.trainable_cond_mask(kinds).float()

        audio_global, audio_tokens = self.embed_audio(audio, motion_frames)
        if audio_tokens.shape[1] != grid[0]:
            raise ValueError(f"the audio gives {audio_tokens.shape[1]} latent frames but x has {grid[0]}; "
                             "the clip's audio needs 4 frames per latent frame")

        # t for the x tokens and 0 for ref/motion, embedded together (official zero_timestep).
        both = torch.cat([timestep.reshape(batch), timestep.new_zeros(1)])
        time_emb, time_mod = self.embed_time(self.time_sinusoid(both))
        time_mod = torch.cat([time_mod[:batch], time_mod[batch:].expand(batch, -1, -1, -1)], dim=1)

        angles = rope_angles(token_positions(grid, not drop_motion_frames), self.config.head_dim)
        angles = angles.to(x.device)[:, None]
        return S2VInputs(tokens, grid[0] * grid[1] * grid[2], time_emb[:batch], time_mod, self.embed_text(context),
                         torch.cos(angles).float(), torch.sin(angles).float(), audio_tokens, audio_global, grid)

    def run_s2v_block(self, index: int, tokens: Tensor, inputs: S2VInputs) -> Tensor:
        """Block `index`, then its audio injection if it has one."""
        tokens = self.blocks[index](tokens, inputs.time_mod, inputs.num_x_tokens, inputs.context,
                                    inputs.rope_cos, inputs.rope_sin)
        return self.inject_audio(index, tokens, inputs)

    def inject_audio(self, index: int, tokens: Tensor, inputs: S2VInputs) -> Tensor:
        """x tokens frame by frame: AdaIN by the frame's global audio token, cross-attention
        to the frame's audio tokens, added back. Ref and motion tokens are untouched."""
        slot = self.injector_of_block.get(index)
        if slot is None:
            return tokens
        frames = inputs.grid[0]
        n = inputs.num_x_tokens
        per_frame = tokens[:, :n].unflatten(1, (frames, -1)).flatten(0, 1)
        normed = self.audio_injector.injector_adain_layers[slot](per_frame, inputs.audio_global.flatten(0, 1)[:, 0])
        residual = self.audio_injector.injector[slot](normed, inputs.audio_tokens.flatten(0, 1))
        residual = residual.unflatten(0, (tokens.shape[0], frames)).flatten(1, 2)
        return torch.cat([tokens[:, :n] + residual.float(), tokens[:, n:]], dim=1)

    def unembed_s2v(self, tokens: Tensor, inputs: S2VInputs) -> Tensor:
        return self.unpatchify(self.head(tokens[:, :inputs.num_x_tokens], inputs.time_emb), inputs.grid)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, ref_latents: Tensor,  # type: ignore[override]
                motion_latents: Tensor, cond_states: Tensor, audio: Tensor,
                motion_frames: tuple[int, int] = (17, 5), drop_motion_frames: bool = False) -> Tensor:
        inputs = self.embed_s2v(x, timestep, context, ref_latents, motion_latents, cond_states, audio,
                                motion_frames, drop_motion_frames)
        tokens = inputs.tokens
        for index in range(len(self.blocks)):
            tokens = self.run_s2v_block(index, tokens, inputs)
        return self.unembed_s2v(tokens, inputs)
