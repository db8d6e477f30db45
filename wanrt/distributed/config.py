"""How a multi-process run splits the work: the options of `wanrt generate --gpus N`.

Modes (official flags where the official code has them):
- Ulysses sequence parallelism (`--ulysses N`): every rank holds the whole expert and a
  1/N slice of the video tokens; self-attention exchanges slices for heads (all-to-all).
- CFG parallel (`--cfg-parallel`): the conditional and unconditional forwards of a step
  run on two ranks at once. Combined with Ulysses, world = 2 x ulysses.
- FSDP (`--dit-fsdp`, `--t5-fsdp`): the weights of every block are sharded over all
  ranks and gathered block by block, so N GPUs hold one copy of the model between them.
- Expert per GPU (`--expert-per-gpu`): the high-noise expert on rank 0, the low-noise one
  on rank 1, latents handed over at the boundary (two consumer cards, A14B tasks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wanrt.configs import TaskSpec
from wanrt.errors import InputError


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int = 1
    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    expert_per_gpu: bool = False

    @classmethod
    def from_options(cls, world_size: int, ulysses_size: int | None = None, cfg_parallel: bool = False,
                     dit_fsdp: bool = False, t5_fsdp: bool = False,
                     expert_per_gpu: bool = False) -> "ParallelConfig":
        """Unset `ulysses_size` takes the ranks that CFG and expert parallelism leave, so
        `--gpus N` alone runs Ulysses over N ranks."""
        if ulysses_size is None:
            ulysses_size = 1 if expert_per_gpu else max(1, world_size // (2 if cfg_parallel else 1))
        return cls(world_size, ulysses_size, cfg_parallel, dit_fsdp, t5_fsdp, expert_per_gpu)

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check(self, task: TaskSpec, precision: str = "bf16", quantized: bool = False,
              t5_cpu: bool = False) -> "ParallelConfig":
        """Refuse combinations that cannot run, with one line naming the flag."""
        world, ulysses = self.world_size, self.ulysses_size
        if world < 1 or ulysses < 1:
            raise InputError(f"--gpus {world} and --ulysses {ulysses} must be at least 1")
        if world == 1:
            chosen = [flag for flag, on in (("--ulysses", ulysses > 1), ("--cfg-parallel", self.cfg_parallel),
                                            ("--dit-fsdp", self.dit_fsdp), ("--t5-fsdp", self.t5_fsdp),
                                            ("--expert-per-gpu", self.expert_per_gpu)) if on]
            if chosen:
                raise InputError(f"{chosen[0]} needs several processes: add --gpus 2 (or more), "
                                 "or run under torchrun")
            return self
        if self.expert_per_gpu:
            if not task.is_moe:
                raise InputError(f"--expert-per-gpu needs a two-expert task (t2v-A14B, i2v-A14B); "
                                 f"{task.name} has a single DiT")
            if world != 2:
                raise InputError(f"--expert-per-gpu runs on exactly 2 GPUs, not {world}; use --gpus 2")
            if ulysses > 1 or self.cfg_parallel or self.dit_fsdp or self.t5_fsdp:
                raise InputError("--expert-per-gpu cannot be combined with --ulysses, --cfg-parallel, "
                                 "--dit-fsdp or --t5-fsdp: each GPU runs its own expert")
            return self
        if self.cfg_parallel and world % 2:
            raise InputError(f"--cfg-parallel splits the ranks in two; --gpus {world} is odd")
        heads = task.dit.num_heads
        if heads % ulysses:
            raise InputError(f"--ulysses {ulysses} must divide the {heads} attention heads of {task.name}")
        fsdp_only = ulysses == 1 and not self.cfg_parallel and (self.dit_fsdp or self.t5_fsdp)
        if ulysses * self.cfg_size != world and not fsdp_only:
            times_cfg = " x 2 (--cfg-parallel)" if self.cfg_parallel else ""
            raise InputError(f"--ulysses {ulysses}{times_cfg} must use all --gpus {world} ranks; "
                             f"use --ulysses {world // self.cfg_size}")
        if self.t5_fsdp and t5_cpu:
            raise InputError("--t5-fsdp shards T5 over the GPUs; drop --t5-cpu")
        if self.dit_fsdp and (precision != "bf16" or quantized):
            raise InputError("--dit-fsdp shards the checkpoint's bf16 weights; drop --precision "
                             f"{precision} / --quantized")
        return self

    def record(self) -> dict:
        """What the sidecar stores about the split."""
        return {**asdict(self), "mode": self.mode()}

    def mode(self) -> str:
        if not self.distributed:
            return "single"
        if self.expert_per_gpu:
            return "expert-per-gpu"
        parts = [f"ulysses{self.ulysses_size}"] if self.ulysses_size > 1 else []
        parts += [name for name, on in (("cfg-parallel", self.cfg_parallel), ("dit-fsdp", self.dit_fsdp),
                                        ("t5-fsdp", self.t5_fsdp)) if on]
        return "+".join(parts)
