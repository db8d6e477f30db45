"""Preview many cheaply: N candidates of one prompt at a low resolution and step count.

One loaded `Pipeline` and one prompt embedding serve every candidate; candidate i uses
seed `base_seed + i`, so each is reproducible on its own (`wanrt generate --seed`, or
`wanrt refine --from DIR --pick i`). The folder gets, per candidate, what `wanrt generate`
writes (mp4, JSON sidecar, latents), plus a contact sheet (first/middle/last frame of each)
and `index.json`, which `wanrt.refine` reads.

Under torchrun the candidates are dealt round-robin over the ranks (each rank loads the
models on its own GPU); rank 0 draws the base seed, gathers every rank's records and alone
writes the contact sheet and the index. A rank that fails stops every rank with its message
(`wanrt.distributed.launch.run_rank`). With `--expert-per-gpu` two ranks split the A14B
experts instead and pipeline the candidates, so both cards stay busy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from wanrt.configs import TaskSpec, parse_size
from wanrt.distributed.launch import RankContext
from wanrt.errors import ConfigError, InputError
from wanrt.generate import EmbeddingCache, check_output_path, generate_video, text_embeddings
from wanrt.loading.save import write_atomic, write_json
from wanrt.pipelines import GenerationRequest, Pipeline, ResolvedRequest, StepInfo
from wanrt.progress import track
from wanrt.video_io import frames_to_uint8, read_video

INDEX_NAME = "index.json"
INDEX_FORMAT = "wanrt-preview/1"
CONTACT_SHEET_NAME = "contact_sheet.png"


@dataclass(frozen=True)
class PreviewDefaults:
    size: str
    steps: int


# About a quarter of the smallest official area and half the official steps: a candidate
# costs roughly 1/8 of a 480P generation. Sizes are multiples of the VAE stride x patch
# (16 for Wan2.1's VAE, 32 for ti2v-5B's Wan2.2 VAE).
PREVIEW_DEFAULTS: dict[str, PreviewDefaults] = {
    "t2v-A14B": PreviewDefaults("416*240", 20),
    "i2v-A14B": PreviewDefaults("416*240", 20),
    "ti2v-5B": PreviewDefaults("640*352", 20),
    "tiny-t2v": PreviewDefaults("32*32", 3),
    "tiny-i2v": PreviewDefaults("32*32", 3),
    "tiny-ti2v": PreviewDefaults("64*32", 3),
}


def preview_defaults(task: TaskSpec) -> PreviewDefaults:
    try:
        return PREVIEW_DEFAULTS[task.name]
    except KeyError:
        raise InputError(f"--task {task.name} has no preview defaults; choose one of "
                         f"{', '.join(PREVIEW_DEFAULTS)}") from None


def check_preview_size(task: TaskSpec, size: str) -> str:
    """Any WIDTH*HEIGHT whose latent grid splits into whole DiT patches (previews are not
    limited to the official sizes)."""
    try:
        width, height = parse_size(size)
    except ConfigError:
        raise InputError(f"--size {size!r} must be WIDTH*HEIGHT, e.g. 416*240") from None
    multiple = task.vae_stride[1] * task.dit.patch_size[1]
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise InputError(f"--size {size}: width and height must be positive multiples of {multiple} "
                         f"for {task.name}, e.g. {preview_defaults(task).size}")
    return f"{width}*{height}"


def preview_request(task: TaskSpec, request: GenerationRequest) -> ResolvedRequest:
    """`request` with the preview defaults for what it leaves unset (size, steps); the
    rest resolves exactly as `wanrt generate` would."""
    defaults = preview_defaults(task)
    size = check_preview_size(task, request.size or defaults.size)
    steps = defaults.steps if request.steps is None else request.steps
    resolved = dataclasses.replace(request, size=None, steps=steps).resolved(task)
    return dataclasses.replace(resolved, size=size)


# ---------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """What the candidates are dealt over: this process alone, or every rank of a torchrun
    launch (`context`, from `wanrt.distributed.launch.run_rank`, which also stops every
    rank within seconds when one fails)."""

    context: RankContext | None = None
    # Two ranks, one A14B expert each: rank 0 runs every candidate's high-noise steps while
    # rank 1 runs the previous candidate's low-noise ones, then rank 0 decodes and writes.
    expert_per_gpu: bool = False

    def __post_init__(self) -> None:
        if self.expert_per_gpu and self.world_size != 2:
            raise InputError(f"--expert-per-gpu needs exactly 2 processes, got {self.world_size}: "
                             "torchrun --nproc_per_node 2 -m wanrt preview ... --expert-per-gpu")

    @property
    def rank(self) -> int:
        return self.context.rank if self.context is not None else 0

    @property
    def world_size(self) -> int:
        return self.context.world_size if self.context is not None else 1

    def share(self, count: int) -> range:
        """The candidates (of `count`) this rank decodes and writes: round-robin, or all on
        rank 0 when the ranks split the experts instead."""
        if self.expert_per_gpu:
            return range(count) if self.rank == 0 else range(0)
        return range(self.rank, count, self.world_size)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        return value if self.context is None else self.context.broadcast(value if self.rank == 0 else None)

    def gather(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        return list(items) if self.context is None else self.context.gather(items)


# ---------------------------------------------------------------------- embeddings


class SharedEmbeddings(EmbeddingCache):
    """Prompt embeddings held in memory for a whole preview, in front of the optional disk
    cache: the N candidates run the text encoder (or read the disk) once, not N times."""

    def __init__(self, disk: EmbeddingCache | None) -> None:
        super().__init__(disk.folder if disk is not None else None)
        self.disk = disk
        self.memory: dict[str, Tensor] = {}

    def get(self, pipeline: Pipeline, prompt: str) -> Tensor | None:
        if prompt not in self.memory and self.disk is not None:
            found = self.disk.get(pipeline, prompt)
            if found is not None:
                self.memory[prompt] = found
        return self.memory.get(prompt)

    def put(self, pipeline: Pipeline, prompt: str, embedding: Tensor) -> None:
        self.memory[prompt] = embedding
        if self.disk is not None:
            self.disk.put(pipeline, prompt, embedding)


# ---------------------------------------------------------------------- the run


@dataclass(frozen=True)
class PreviewCandidate:
    index: int
    seed: int
    video: str      # file names relative to the preview folder
    sidecar: str
    latents: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PreviewIndex:
    """What `index.json` holds: the shared settings and one entry per candidate."""

    folder: Path
    task: str
    ckpt_dir: str
    settings: dict[str, Any]          # ResolvedRequest.settings() of candidate 0 (its seed is base_seed)
    base_seed: int
    seed_was_random: bool
    image_path: str | None
    candidates: tuple[PreviewCandidate, ...]
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "task": self.task, "ckpt_dir": self.ckpt_dir,
                "settings": self.settings, "base_seed": self.base_seed,
                "seed_was_random": self.seed_was_random, "image_path": self.image_path,
                "contact_sheet": CONTACT_SHEET_NAME, "world_size": self.world_size,
                "candidates": [candidate.to_dict() for candidate in self.candidates]}

    @classmethod
    def load(cls, folder: Path) -> "PreviewIndex":
        """Read `<folder>/index.json`; InputError naming `--from` if it is not a preview."""
        folder = Path(folder)
        path = folder / INDEX_NAME
        if not path.is_file():
            raise InputError(f"--from {folder}: no {INDEX_NAME} there; pass a folder written by `wanrt preview`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {INDEX_FORMAT}")
            candidates = tuple(PreviewCandidate(**entry) for entry in raw["candidates"])
            return cls(folder, raw["task"], raw["ckpt_dir"], raw["settings"], raw["base_seed"],
                       raw["seed_was_random"], raw["image_path"], candidates, raw["world_size"])
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"--from {folder}: {path} is not a wanrt preview index ({error}); "
                             "write it again with `wanrt preview`") from None

    def candidate(self, pick: int) -> PreviewCandidate:
        """Candidate `pick`; InputError naming `--pick` and the valid range otherwise."""
        if not 0 <= pick < len(self.candidates):
            raise InputError(f"--pick {pick} is out of range: {self.folder} holds candidates "
                             f"0..{len(self.candidates) - 1}")
        return self.candidates[pick]


def candidate_stem(index: int) -> str:
    return f"candidate_{index:02d}"


def check_preview_folder(folder: Path) -> Path:
    """Refuse a folder that already holds a preview (it may be the one to refine) or
    cannot be written, before any model loads."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file; give a folder for the preview")
    if (folder / INDEX_NAME).exists():
        raise InputError(f"--out {folder} already holds a preview ({INDEX_NAME}); choose a new folder")
    check_output_path(folder / f"{candidate_stem(0)}.mp4")
    return folder


def draw_base_seed(count: int) -> int:
    """A random base seed whose candidates' seeds all stay within the official range."""
    return secrets.randbelow(sys.maxsize - count + 2)


def run_preview(pipeline: Pipeline, request: GenerationRequest, count: int, folder: Path, *,
                embedding_cache: EmbeddingCache | None, ranks: Ranks = Ranks(),
                image_path: Path | None = None,
                on_candidate: Callable[[int, int], None] | None = None,
                on_step: Callable[[StepInfo], None] | None = None) -> PreviewIndex:
    """Write `count` candidates, the contact sheet and the index into `folder`.

    `request` is resolved with the preview defaults (`preview_request`); a negative seed
    draws the base seed at random (recorded). Under torchrun (`ranks` holding the run's
    `RankContext`) every rank calls this and each runs its share; rank 0 writes the
    contact sheet and the index. Returns the index on every rank.
    """
    if count < 1:
        raise InputError(f"--count {count} must be at least 1")
    folder = check_preview_folder(folder)
    resolved = preview_request(pipeline.task, request)
    seed_was_random = resolved.seed < 0
    base_seed = ranks.broadcast(draw_base_seed(count) if seed_was_random else resolved.seed)
    if base_seed + count - 1 > sys.maxsize:
        raise InputError(f"--seed {base_seed}: the candidates' seeds {base_seed}..{base_seed + count - 1} "
                         f"exceed {sys.maxsize}; use a smaller seed")
    shared = SharedEmbeddings(embedding_cache)
    options = {"preview": {"folder": str(folder.absolute()), "count": count, "base_seed": base_seed,
                           "expert_per_gpu": ranks.expert_per_gpu},
               "image_path": str(image_path.absolute()) if image_path else None}
    sampled = (sample_expert_stages(pipeline, ranks, resolved, base_seed, count, shared, on_step)
               if ranks.expert_per_gpu else {})
    written = []
    for index in track(ranks.share(count), "preview candidates"):
        seed = base_seed + index
        if on_candidate is not None:
            on_candidate(index, seed)
        # Latents the expert stages already sampled are only decoded and written here.
        sample = (lambda *_, latents=sampled[index], **__: latents) if index in sampled else None
        record = generate_video(pipeline, dataclasses.replace(resolved, seed=seed),
                                folder / f"{candidate_stem(index)}.mp4", embedding_cache=shared,
                                on_step=on_step, run_options={**options, "candidate": index}, sample=sample)
        written.append(PreviewCandidate(index, seed, record.video_path.name, record.sidecar_path.name,
                                        record.latents_path.name))
    candidates = tuple(sorted(ranks.gather(written), key=lambda candidate: candidate.index))
    index = PreviewIndex(folder, pipeline.task.name, str(pipeline.files.root.resolve()),
                         dataclasses.replace(resolved, seed=base_seed).settings(), base_seed,
                         seed_was_random, str(image_path.absolute()) if image_path else None,
                         candidates, ranks.world_size)
    if ranks.rank == 0:
        write_contact_sheet(folder / CONTACT_SHEET_NAME,
                            [(c.index, c.seed, read_video(folder / c.video)[0]) for c in candidates])
        write_json(folder / INDEX_NAME, index.to_dict())
    return index


def sample_expert_stages(pipeline: Pipeline, ranks: Ranks, request: ResolvedRequest, base_seed: int, count: int,
                         embeddings: EmbeddingCache, on_step: Callable[[StepInfo], None] | None) -> dict[int, Tensor]:
    """Every candidate's final latents on rank 0 (by index; {} on rank 1), sampled by the
    two expert stages overlapped (`wanrt.distributed.expert_parallel.sample_pipelined`).
    Rank 0 encodes the prompts once (through `embeddings`) and hands them over."""
    from wanrt.distributed.expert_parallel import SamplingJob, sample_pipelined

    encoded = text_embeddings(pipeline, request, embeddings)[0] if ranks.rank == 0 else None
    encoded = ranks.broadcast(encoded)
    jobs = [SamplingJob(dataclasses.replace(request, seed=base_seed + index), encoded) for index in range(count)]
    return dict(enumerate(sample_pipelined(pipeline, ranks.context, jobs, on_step)))


# ---------------------------------------------------------------------- contact sheet

SHEET_PADDING = 4
LABEL_HEIGHT = 14
# Thumbnails are at least this wide (tiny previews are scaled up by a whole factor, so the
# label fits and pixels stay exact) and at most the widest preview default.
MIN_THUMB_WIDTH, MAX_THUMB_WIDTH = 96, 416


def thumbnail_scale(width: int) -> float:
    """Factor from a frame's width to its thumbnail's: a whole number when enlarging."""
    if width < MIN_THUMB_WIDTH:
        return float(math.ceil(MIN_THUMB_WIDTH / width))
    return min(1.0, MAX_THUMB_WIDTH / width)


def sheet_frame_indices(num_frames: int) -> tuple[int, int, int]:
    return 0, num_frames // 2, num_frames - 1


def write_contact_sheet(path: Path, videos: list[tuple[int, int, Tensor]]) -> None:
    """One row per candidate (index, seed, video `[3, T, H, W]` in [-1, 1]): a label, then
    its first, middle and last frame. Written atomically as a PNG."""
    from PIL import Image, ImageDraw

    _, _, height, width = videos[0][2].shape
    scale = thumbnail_scale(width)
    thumb_w, thumb_h = round(width * scale), round(height * scale)
    row_h = LABEL_HEIGHT + thumb_h + SHEET_PADDING
    sheet = Image.new("RGB", (3 * thumb_w + 4 * SHEET_PADDING, len(videos) * row_h + SHEET_PADDING), "white")
    draw = ImageDraw.Draw(sheet)
    # Enlarged thumbnails repeat pixels (exact); reduced ones are filtered.
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    for row, (index, seed, video) in enumerate(videos):
        top = SHEET_PADDING + row * row_h
        frames = ",".join(str(f) for f in sheet_frame_indices(video.shape[1]))
        draw.text((SHEET_PADDING, top), f"#{index} | seed {seed} | frames {frames}", fill="black")
        for column, frame in enumerate(sheet_frame_indices(video.shape[1])):
            pixels = frames_to_uint8(video[:, frame]).permute(1, 2, 0).contiguous().numpy()
            thumb = Image.fromarray(pixels).resize((thumb_w, thumb_h), resample)
            sheet.paste(thumb, (SHEET_PADDING + column * (thumb_w + SHEET_PADDING), top + LABEL_HEIGHT))
    write_atomic(Path(path), lambda tmp: sheet.save(tmp, format="PNG"))
