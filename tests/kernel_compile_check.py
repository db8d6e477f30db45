"""Compile wanrt's Triton kernels for NVIDIA GPUs on a machine without one, and report the
tensor-core instructions each variant's PTX uses and its shared memory.

Triton ships its own LLVM and ptxas, so `triton.compile` for a `GPUTarget` goes all the way
to a cubin on the CPU. The interpreter (TRITON_INTERPRET=1) checks the kernels' numbers but
not that they compile: it accepts what the compiler refuses (a non-constexpr global, a dtype
a target's MMA lacks). tests/test_attention.py runs this in a subprocess without the
interpreter and checks the JSON it prints.

    python tests/kernel_compile_check.py
"""

from __future__ import annotations

import json
import re

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from wanrt.kernels.row_quant import CHUNK, _quantize_rows_kernel
from wanrt.kernels.sage_attention import _attention_kernel, _quantize_blocks_kernel

# Tensor-core MMA instructions: Ampere/Ada `mma.sync...`, Hopper `wgmma.mma_async...`.
MMA = re.compile(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)")

ATTENTION_TYPES = {"q_ptr": "*i8", "k_ptr": "*i8", "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32",
                   "v_scale_ptr": "*fp32", "mask_ptr": "*i8", "out_ptr": "*bf16"}


def compile_kernel(fn, types: dict[str, str], constexprs: dict[str, object], capability: int, num_warps: int):
    """`fn` compiled for sm_`capability`; every parameter not in `types` or `constexprs` is an i32."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    positions = {name: index for index, name in enumerate(fn.arg_names)}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(positions[name],): value for name, value in constexprs.items()})
    return compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def describe(kernel) -> dict:
    return {"mma": sorted(set(MMA.findall(kernel.asm["ptx"]))), "shared_bytes": kernel.metadata.shared,
            "cubin_bytes": len(kernel.asm["cubin"])}


def main() -> None:
    report = {}
    # (capability, P·V dtype): Ampere runs fp16 P·V; Ada and Hopper the fp8 one wanrt picks there.
    for capability, v_type, p_scale in ((80, "*fp16", 1.0), (89, "*fp8e4nv", 448.0), (90, "*fp8e4nv", 448.0)):
        kernel = compile_kernel(_attention_kernel, {**ATTENTION_TYPES, "v_ptr": v_type},
                                {"HAS_MASK": True, "P_SCALE": p_scale, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 128},
                                capability, num_warps=8)
        report[f"attention sm{capability} {v_type[1:]}"] = describe(kernel)
    kernel = compile_kernel(_quantize_blocks_kernel, {"x_ptr": "*fp32", "mean_ptr": "*fp32", "mask_ptr": "*i8",
                                                      "out_ptr": "*i8", "scale_ptr": "*fp32", "multiplier": "fp32"},
                            {"HAS_MEAN": True, "HAS_MASK": True, "BLOCK": 64, "BLOCK_D": 128}, 90, num_warps=4)
    report["quantize_blocks sm90"] = describe(kernel)
    for out_type in ("*i8", "*fp8e4nv"):
        kernel = compile_kernel(_quantize_rows_kernel, {"x_ptr": "*bf16", "out_ptr": out_type, "scale_ptr": "*fp32",
                                                        "qmax": "fp32"},
                                {"ROUND": out_type == "*i8", "CHUNK": CHUNK}, 90, num_warps=4)
        report[f"quantize_rows sm90 {out_type[1:]}"] = describe(kernel)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
