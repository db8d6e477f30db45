"""Finding and loading the components of a Wan2.2 checkpoint, official or diffusers layout.

Official layout (as released):
    high_noise_model/ low_noise_model/   (A14B experts; the 5B model is the folder itself)
        config.json, diffusion_pytorch_model[-0000k-of-0000n].safetensors[.index.json]
    Wan2.1_VAE.pth | Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/
Diffusers layout:
    model_index.json, transformer/ (high-noise), transformer_2/ (low-noise), vae/,
    text_encoder/, tokenizer/

Whatever the layout, tensors are renamed to the official names through one explicit key
map per component, checked strictly against the model built on `meta`, then assigned.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from wanrt.configs import TASK_NAMES, DiTConfig, T5Config, TaskSpec, VAEConfig, get_task
from wanrt.errors import CheckpointError, ConfigError
from wanrt.loading import diffusers_dit, single_file
from wanrt.loading.files import (TensorInfo, check_pth_archive, iter_safetensors, load_pth, merge_unique,
                                 read_safetensors_header, require_file, safetensors_shards)
from wanrt.loading.state import assign_tensors, cast_for_model, check_state_keys
from wanrt.models.dit import WanDiT
from wanrt.progress import track


class Layout(str, Enum):
    OFFICIAL = "official"
    DIFFUSERS = "diffusers"


class Expert(str, Enum):
    HIGH_NOISE = "high_noise"
    LOW_NOISE = "low_noise"
    # The single DiT of a non-MoE task (ti2v-5B).
    ONLY = "only"


@dataclass(frozen=True)
class CheckpointFiles:
    """Where each component of a checkpoint lives; nothing is checked until it is loaded,
    so a folder holding only the DiT is enough for a run that never needs T5 or the VAE."""

    layout: Layout
    root: Path
    dit_dirs: Mapping[Expert, Path]
    vae: Path
    t5: Path
    tokenizer: Path


def locate_checkpoint(root: Path, task: TaskSpec) -> CheckpointFiles:
    root = Path(root)
    if not root.is_dir():
        if task.name.startswith("tiny-"):
            raise CheckpointError(f"{root}: checkpoint folder not found; check --ckpt-dir: the random-weight "
                                  f"{task.name} checkpoint is written by `wanrt demo --task {task.name}` (into "
                                  f"the cache folder's demo/{task.name})")
        raise CheckpointError(f"{root}: checkpoint folder not found; check --ckpt-dir")
    if (root / "model_index.json").is_file():
        if task.is_moe:
            dit_dirs = {Expert.HIGH_NOISE: root / "transformer", Expert.LOW_NOISE: root / "transformer_2"}
        else:
            dit_dirs = {Expert.ONLY: root / "transformer"}
        return CheckpointFiles(Layout.DIFFUSERS, root, dit_dirs, root / "vae", root / "text_encoder",
                               root / "tokenizer")
    if task.is_moe:
        dit_dirs = {Expert.HIGH_NOISE: root / task.high_noise_subdir,
                    Expert.LOW_NOISE: root / task.low_noise_subdir}
    else:
        dit_dirs = {Expert.ONLY: root}
    return CheckpointFiles(Layout.OFFICIAL, root, dit_dirs, root / task.vae_checkpoint,
                           root / task.t5_checkpoint, root / task.t5_tokenizer)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    require_file(path, what)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: {what} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object; download it again")
    return raw


def shard_headers(shards: list[Path], rename: Callable[[str], str] = str) -> dict[str, TensorInfo]:
    """Renamed key -> shape/dtype over all shards; a key in two shards is refused."""
    infos: dict[str, TensorInfo] = {}
    sources: dict[str, Path] = {}
    for shard in shards:
        header = read_safetensors_header(shard)
        try:
            renamed = {rename(key): info for key, info in header.items()}
        except CheckpointError as exc:
            raise CheckpointError(f"{shard}: {exc}") from None
        merge_unique(infos, renamed, shard, sources)
    return infos


def _renamed_chunks(shards: list[Path], rename: Callable[[str], str]) -> Iterator[dict[str, Tensor]]:
    for shard in track(shards, f"loading {shard_owner(shards)}"):
        yield {rename(key): tensor for key, tensor in iter_safetensors(shard)}


def shard_owner(shards: list[Path]) -> str:
    """What a progress line calls a set of shards: their folder's name."""
    return shards[0].parent.name if shards else "weights"


_DIT_ARCH_FIELDS = ("model_type", "in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers",
                    "freq_dim", "text_dim", "text_len", "patch_size")


def check_dit_variant(found: DiTConfig, expected: DiTConfig, source: str) -> None:
    """Refuse a DiT of another variant (e.g. a 16-channel t2v expert given to i2v)."""
    diffs = [f"{name} {_plain(getattr(found, name))} (needs {_plain(getattr(expected, name))})"
             for name in _DIT_ARCH_FIELDS if getattr(found, name) != getattr(expected, name)]
    if diffs:
        raise CheckpointError(
            f"{source}: this {_plain(found.model_type)} DiT does not fit the task: {', '.join(diffs)}; "
            "point --ckpt-dir at the checkpoint of the task you asked for")


def complete_dit_config(config: DiTConfig, infos: Mapping[str, TensorInfo], expect: DiTConfig | None,
                        source: str) -> DiTConfig:
    """Fill text_dim from the weights (the official config.json never stores it), then
    refuse a DiT of another variant than `expect`."""
    if "text_embedding.0.weight" in infos:
        config = dataclasses.replace(config, text_dim=infos["text_embedding.0.weight"].shape[1])
    if expect is not None:
        check_dit_variant(config, expect, source)
    return config


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _official_config(raw: dict[str, Any], config_path: Path) -> DiTConfig:
    try:
        return DiTConfig.from_official_json(raw, str(config_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def read_dit_config(folder: Path, expect: DiTConfig | None = None
                    ) -> tuple[DiTConfig, list[Path], Callable[[str], str], dict[str, TensorInfo]]:
    """A DiT folder's architecture from its config.json and tensor headers (no weights
    read), with its shards, its key rename to the official names, and the headers."""
    folder = Path(folder)
    config_path = folder / "config.json"
    raw = _read_json(config_path, "DiT config.json")
    if raw.get("_class_name") == "WanTransformer3DModel":
        rename = diffusers_dit.official_key
        text_len = expect.text_len if expect is not None else DiTConfig.text_len
        config = diffusers_dit.config_from_diffusers(raw, str(config_path), text_len=text_len)
    else:
        rename = str
        config = _official_config(raw, config_path)
    shards = safetensors_shards(folder, "diffusion_pytorch_model")
    infos = shard_headers(shards, rename)
    return complete_dit_config(config, infos, expect, str(folder)), shards, rename, infos


def load_dit(folder: Path, expect: DiTConfig | None = None, dtype: torch.dtype | None = None,
             leave_in_file: Callable[[str], bool] | None = None) -> WanDiT:
    """Load one DiT (expert) folder of either layout, or a single file of any format
    `single_file` reads; `expect` is the task's architecture.

    Parameters named by `leave_in_file` are not read: they stay on the meta device with the
    dtype they would be loaded in, for a streamer that reads them from the file itself
    (`dit_tensor_infos`)."""
    folder = Path(folder)
    if folder.is_file():
        if expect is None:
            raise CheckpointError(f"{folder}: a single-file DiT needs the task's architecture to check it")
        if leave_in_file is not None:
            raise CheckpointError(f"{folder}: RAM mode stream-file reads blocks from checkpoint folders; a "
                                  "single-file DiT loads whole (give more --ram, or --precision fp8)")
        return single_file.load_dit_file(folder, expect, dtype)
    model, shards, rename, infos = _checked_dit(folder, expect)
    if leave_in_file is None:
        return assign_tensors(model, _renamed_chunks(shards, rename), dtype)
    keep_fp32 = tuple(model.keep_in_fp32)
    for key in filter(leave_in_file, infos):
        module_name, _, name = key.rpartition(".")
        getattr(model.get_submodule(module_name), name).data = cast_for_model(
            key, torch.empty(infos[key].shape, dtype=infos[key].dtype, device="meta"), dtype, keep_fp32)
    chunks = ({key: t for key, t in chunk.items() if not leave_in_file(key)}
              for chunk in _renamed_chunks(shards, rename))
    return assign_tensors(model, chunks, dtype, left_on_meta=leave_in_file)


def dit_tensor_infos(folder: Path, expect: DiTConfig | None = None) -> dict[str, TensorInfo]:
    """Official parameter name -> shape, dtype, file and byte offset of a DiT folder's tensors."""
    return read_dit_config(folder, expect)[3]


def _checked_dit(folder: Path, expect: DiTConfig | None
                 ) -> tuple[WanDiT, list[Path], Callable[[str], str], dict[str, TensorInfo]]:
    """The DiT of `folder` built on `meta`, its shards, key map and headers, after checking
    its config and every shard header against the model: no tensor data is read."""
    config, shards, rename, infos = read_dit_config(folder, expect)
    with torch.device("meta"):
        model = WanDiT(config)
    check_state_keys(model, infos, str(folder))
    return model, shards, rename, infos


def _holds_task(root: Path, task: TaskSpec) -> bool:
    """Whether `root` is a checkpoint of `task`, judged by its first DiT's architecture."""
    folder = next(iter(locate_checkpoint(root, task).dit_dirs.values()))
    if not (folder / "config.json").is_file():
        return False
    try:
        read_dit_config(folder, task.dit)
    except CheckpointError:
        return False
    return True


def check_checkpoint_task(root: Path, task: TaskSpec) -> None:
    """Before anything loads: a folder holding another known task's checkpoint is named,
    instead of failing later on a list of mismatched tensor shapes. A folder that matches
    no known task is left to the loaders, whose errors name the file at fault."""
    if _holds_task(root, task):
        return
    for name in TASK_NAMES:
        if name != task.name and _holds_task(root, get_task(name)):
            raise CheckpointError(f"{root}: this folder holds a {name} checkpoint, not {task.name}; "
                                  f"use --task {name} (or point --ckpt-dir at a {task.name} checkpoint)")


def _load_state(path: Path, stem: str, to_official: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                official_key: str, prefixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """All tensors of a component: a weights-only .pth file, a diffusers folder renamed, or a
    single file (ComfyUI/Kijai repackages; official names when `official_key` is among them,
    else the diffusers/transformers names renamed)."""
    if path.is_dir() or single_file.is_single_file(path):
        if path.is_dir():
            state: dict[str, Tensor] = {}
            sources: dict[str, Path] = {}
            for shard in safetensors_shards(path, stem):
                merge_unique(state, dict(iter_safetensors(shard)), shard, sources)
        else:
            state = single_file.read_state(path, prefixes)
            if official_key in state:
                return state
        try:
            return to_official(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return load_pth(path)


def load_vae(path: Path, expect: VAEConfig, dtype: torch.dtype | None = None):
    """The VAE from `Wan2.x_VAE.pth` or a diffusers `vae/` folder."""
    model, state = _checked_vae(Path(path), expect)
    return assign_tensors(model, [state], dtype)


def _checked_vae(path: Path, expect: VAEConfig):
    """The VAE built on `meta` and its (memory-mapped) state, checked against each other."""
    from wanrt.loading import diffusers_vae
    from wanrt.models.vae import WanVAE

    path = Path(path)
    config = expect
    if path.is_dir():
        config = diffusers_vae.config_from_diffusers(_read_json(path / "config.json", "VAE config.json"))
        if (config.version, config.z_dim) != (expect.version, expect.z_dim):
            raise CheckpointError(
                f"{path}: a Wan{config.version.value} VAE with {config.z_dim} latent channels, but the "
                f"task needs Wan{expect.version.value} with {expect.z_dim}; use the task's VAE")
    state = _load_state(path, "diffusion_pytorch_model", diffusers_vae.to_official, "conv2.weight",
                        single_file.VAE_PREFIXES)
    z_channels = state["conv2.weight"].shape[0] if "conv2.weight" in state else None
    if z_channels is not None and z_channels != expect.z_dim:
        raise CheckpointError(
            f"{path}: a VAE with {z_channels} latent channels, but the task needs {expect.z_dim} "
            f"(Wan{expect.version.value} VAE); use the task's VAE file")
    with torch.device("meta"):
        model = WanVAE(config)
    check_state_keys(model, state, str(path))
    return model, state


def load_t5(path: Path, expect: T5Config, dtype: torch.dtype | None = None):
    """The umt5-xxl encoder from the official .pth or a transformers `text_encoder/` folder."""
    from wanrt.loading import diffusers_t5
    from wanrt.models.t5 import UMT5Encoder

    path = Path(path)
    config = expect
    if path.is_dir():
        config = dataclasses.replace(
            diffusers_t5.config_from_transformers(_read_json(path / "config.json", "text encoder config.json")),
            text_len=expect.text_len)
    state = _load_state(path, "model", diffusers_t5.to_official, "token_embedding.weight")
    with torch.device("meta"):
        model = UMT5Encoder(config)
    check_state_keys(model, state, str(path))
    return assign_tensors(model, [state], dtype)


def check_dit_matches_vae(dit: DiTConfig, vae: VAEConfig, source: str) -> None:
    """A DiT must predict in the VAE's latent space (16 channels for Wan2.1, 48 for Wan2.2)."""
    if dit.out_dim != vae.z_dim:
        raise CheckpointError(
            f"{source}: the DiT predicts {dit.out_dim} latent channels but the Wan{vae.version.value} "
            f"VAE has {vae.z_dim}; the DiT and the VAE come from different models")


def check_checkpoint(files: CheckpointFiles, task: TaskSpec, check_dits: bool = True) -> None:
    """Check every component a run will load before the run starts, so a broken file is
    found in seconds, not after T5 and hours of sampling: each DiT expert's config and
    shard headers against the task, the VAE's keys, shapes and latent channels
    (memory-mapped, no data read), the tokenizer files and the text encoder's file.
    `check_dits=False` when the experts come from elsewhere (`--quantized`)."""
    from wanrt.models.tokenizer import TOKENIZER_FILES

    if check_dits:
        for folder in files.dit_dirs.values():
            if Path(folder).is_file():
                continue  # a single file (`--dit`): its header was checked against the task when given
            model = _checked_dit(Path(folder), task.dit)[0]
            check_dit_matches_vae(model.config, task.vae, str(folder))
    _checked_vae(Path(files.vae), task.vae)
    for name in TOKENIZER_FILES:
        require_file(Path(files.tokenizer) / name, f"tokenizer file {name}")
    if Path(files.t5).is_dir():
        shard_headers(safetensors_shards(Path(files.t5), "model"))
    elif single_file.is_single_file(Path(files.t5)):
        read_safetensors_header(Path(files.t5))
    else:
        check_pth_archive(Path(files.t5))


# Keys of the official Animate config.json beyond the `WanModel` ones, with the only values
# wanrt runs (sliding windows and the CLIP-less variant were never released).
_ANIMATE_JSON_FIXED = {"window_size": [-1, -1], "use_img_emb": True}
# Runtime options of the official class, not architecture.
_ANIMATE_JSON_RUNTIME = ("use_context_parallel", "motion_encoder_dim")


def load_animate_dit(folder: Path, expect: DiTConfig | None = None, dtype: torch.dtype | None = None):
    """Load a Wan2.2-Animate DiT folder (official layout: `WanAnimateModel` config.json and
    safetensors shards). The face-branch widths are read from the tensor shapes."""
    from wanrt.models.animate_dit import AnimateDiT

    folder = Path(folder)
    config_path = folder / "config.json"
    raw = dict(_read_json(config_path, "DiT config.json"))
    if raw.get("_class_name") != "WanAnimateModel":
        raise CheckpointError(f"{config_path}: a {raw.get('_class_name')!r} config, not WanAnimateModel; "
                              "point --ckpt-dir at the Wan2.2-Animate-14B folder")
    for key, value in _ANIMATE_JSON_FIXED.items():
        if key in raw and raw.pop(key) != value:
            raise CheckpointError(f"{config_path}: {key} must be {value}")
    for key in _ANIMATE_JSON_RUNTIME:
        raw.pop(key, None)
    raw["model_type"] = "animate"
    config = _official_config(raw, config_path)
    shards = safetensors_shards(folder, "diffusion_pytorch_model")
    infos = shard_headers(shards)
    config = complete_dit_config(config, infos, expect, str(folder))
    try:
        with torch.device("meta"):
            model = AnimateDiT(config, _animate_widths(infos, folder))
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    check_state_keys(model, infos, str(folder))
    return assign_tensors(model, _renamed_chunks(shards, str), dtype)


def _animate_widths(infos: Mapping[str, TensorInfo], folder: Path):
    from wanrt.models.animate_dit import AnimateWidths

    try:
        return AnimateWidths.from_shapes({key: info.shape for key, info in infos.items()})
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None


def read_animate_widths(folder: Path):
    """The Animate sub-network widths from the safetensors headers alone (no weight read),
    so inputs can be checked against them before the DiT loads."""
    return _animate_widths(shard_headers(safetensors_shards(Path(folder), "diffusion_pytorch_model")),
                           Path(folder))


def load_clip_vision(path: Path, num_heads: int, dtype: torch.dtype | None = None):
    """The image tower of the official open-clip XLM-R ViT-H/14 `.pth` (weights-only load).

    Key map: `visual.<name>` -> `<name>`. Dropped on purpose, and only these: the text
    tower (`textual.*`, `log_scale`) and what `use_31_block` never runs (the last
    transformer block, `visual.post_norm`, `visual.head`). The widths come from the shapes;
    the head count cannot, so the task gives it."""
    from wanrt.models.clip import ClipVision, ClipVisionConfig

    path = Path(path)
    state = load_pth(path)
    blocks = {int(key.split(".")[2]) for key in state if key.startswith("visual.transformer.")}
    if not blocks or "visual.patch_embedding.weight" not in state or "visual.pos_embedding" not in state:
        raise CheckpointError(f"{path}: not an open-clip XLM-R ViT-H/14 checkpoint (no visual tower)")
    last = max(blocks)
    unused = (f"visual.transformer.{last}.", "visual.post_norm.", "textual.")
    renamed = {key.removeprefix("visual."): tensor for key, tensor in state.items()
               if key.startswith("visual.") and not key.startswith(unused) and key != "visual.head"}
    patch = state["visual.patch_embedding.weight"]
    dim, patch_size = patch.shape[0], patch.shape[-1]
    grid = round((state["visual.pos_embedding"].shape[1] - 1) ** 0.5)
    hidden = state["visual.transformer.0.mlp.0.weight"].shape[0] if "visual.transformer.0.mlp.0.weight" in state else dim
    config = ClipVisionConfig(image_size=grid * patch_size, patch_size=patch_size, dim=dim,
                              mlp_ratio=hidden // dim, num_heads=num_heads, num_layers=last)
    if dim % num_heads:
        raise CheckpointError(f"{path}: CLIP width {dim} is not divisible by {num_heads} heads")
    with torch.device("meta"):
        model = ClipVision(config)
    check_state_keys(model, renamed, str(path))
    return assign_tensors(model, [renamed], dtype)
