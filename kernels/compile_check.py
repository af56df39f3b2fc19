"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90), no GPU needed.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))`` runs the
whole pipeline (ttir, ttgir, llir, ptx, cubin through the ``ptxas`` bundled with the triton wheel) for
the launch configurations ``kernels.triton_*`` choose at the shapes below; the bundled ``cuobjdump
--dump-resource-usage`` then reads registers, local memory (spills) and stack from each cubin, and
the compile metadata gives the dynamic shared memory. A kernel the GPU compiler rejects raises here.
It checks compilation and resources only: numerics need the interpreter tests or a GPU.

Run ``python -m v4train.kernels.compile_check`` for the table; ``tests/kernels/test_kernels_compile.py`` runs it in
``make test`` and fails on a compile error or a spill in a forward kernel.

Shape letters: H heads, D head dim, HI indexer heads, DI indexer head dim.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KernelCase", "KernelReport", "cases", "compile_case", "run", "main"]

ARCH = 90
HOPPER_SMEM_BYTES = 227 * 1024   # opt-in shared memory per block on sm_90
HOPPER_REGS = 255


@dataclass(frozen=True)
class KernelCase:
    """One kernel at one launch configuration: ``forward`` kernels must not spill."""

    name: str
    kernel: str      # attribute name in its module
    module: str      # kernels.<module>
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    forward: bool


@dataclass(frozen=True)
class KernelReport:
    """Resource usage of one compiled case (per thread: registers, spill stores/loads, stack frame and
    local memory in bytes; per block: dynamic shared memory)."""

    case: KernelCase
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    seconds: float

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0 or self.local_bytes > 0


def _ptr(dtype: str) -> str:
    return {"bf16": "*bf16", "fp32": "*fp32", "fp16": "*fp16"}[dtype]


def cases(full: bool = False) -> list[KernelCase]:
    """The checked configurations: V4-Flash attention (H=64, D=512) and indexer (HI=64, DI=128) in bf16,
    a mid-size bf16 shape (H=16, D=128) and fp32 inputs; ``full`` adds the small test shapes."""
    import torch

    from v4train.kernels import triton_module

    attn = triton_module("triton_attention", interpret=False)
    idx = triton_module("triton_indexer", interpret=False)
    out = []
    attn_shapes = [("bf16", 64, 512), ("bf16", 16, 128), ("fp32", 64, 512)]
    if full:
        attn_shapes += [("bf16", 4, 64), ("fp32", 4, 48), ("bf16", 64, 192)]
    for dt, H, D in attn_shapes:
        torch_dt = torch.float32 if dt == "fp32" else torch.bfloat16
        prec = "ieee" if dt == "fp32" else "tf32"
        for backward in (False, True):
            cfg = attn.attention_config(H, D, torch_dt, backward=backward)
            x = _ptr(dt)
            if backward:
                sig = {"Q": x, "KV": x, "SINK": "*fp32", "IDX": "*i32", "O": x, "DO": x, "LSE": "*fp32",
                       "DQ": x, "DKV": "*fp32", "DSINK": "*fp32", "T": "i32", "N": "i32", "K": "i32",
                       "scale": "fp32", "scale_log2e": "fp32"}
            else:
                sig = {"Q": x, "KV": x, "SINK": "*fp32", "IDX": "*i32", "O": x, "LSE": "*fp32", "T": "i32",
                       "N": "i32", "K": "i32", "scale_log2e": "fp32"}
            const = {"H": H, "D": D, "BLOCK_H": cfg.BLOCK_H, "BLOCK_K": cfg.BLOCK_K, "BLOCK_D": cfg.BLOCK_D,
                     "DOT_PREC": prec, "HEADS_FASTEST": cfg.heads_fastest}
            kernel = "_sparse_attn_bwd" if backward else "_sparse_attn_fwd"
            out.append(KernelCase(f"{kernel} {dt} H{H} D{D}", kernel, "triton_attention", sig, const,
                                  cfg.num_warps, cfg.num_stages, forward=not backward))
    idx_shapes = [("bf16", 64, 128), ("fp32", 64, 128)] + ([("fp32", 4, 32)] if full else [])
    for dt, HI, DI in idx_shapes:
        cfg = idx.indexer_config(HI, DI, torch.float32 if dt == "fp32" else torch.bfloat16)
        x = _ptr(dt)
        sig = {"Q": x, "KI": x, "W": x, "START": "*i32", "END": "*i32", "S": "*fp32", "T": "i32",
               "t_begin": "i32", "TC": "i32", "NC": "i32"}
        const = {"HI": HI, "DI": DI, "BLOCK_T": cfg.BLOCK_T, "BLOCK_HI": cfg.BLOCK_HI, "BLOCK_DI": cfg.BLOCK_DI,
                 "BLOCK_N": cfg.BLOCK_N, "DOT_PREC": "ieee" if dt == "fp32" else "tf32"}
        out.append(KernelCase(f"_indexer_scores {dt} HI{HI} DI{DI}", "_indexer_scores", "triton_indexer", sig,
                              const, cfg.num_warps, 1, forward=True))
    cfg = idx.indexer_config(64, 128, torch.bfloat16)
    sig = {"S": "*fp32", "START": "*i32", "END": "*i32", "IDX": "*i32", "VAL": "*fp32", "T": "i32",
           "t_begin": "i32", "TC": "i32", "NC": "i32", "KK": "i32"}
    out.append(KernelCase("_indexer_select", "_indexer_select", "triton_indexer", sig,
                          {"BLOCK": cfg.SELECT_BLOCK}, 4, 1, forward=True))
    # the mHC split (spec 4): hc_mult N = 4, 20 Sinkhorn iterations (2 * 20 - 1 normalisation steps)
    mhc = triton_module("triton_mhc", interpret=False)
    const = {"N": 4, "STEPS": 39, "BLOCK_T": mhc.BLOCK_T}
    fwd_sig = {"z_ptr": "*fp32", "pre_ptr": "*fp32", "post_ptr": "*fp32", "comb_ptr": "*fp32", "den_ptr": "*fp32",
               "T": "i32", "eps": "fp32"}
    bwd_sig = {f"{name}_ptr": "*fp32" for name in ("dpre", "dpost", "dcomb", "pre", "post", "comb", "den", "dz")}
    bwd_sig.update(T="i32", eps="fp32")
    out.append(KernelCase("_split_fwd N4", "_split_fwd", "triton_mhc", fwd_sig, const, 4, 1, forward=True))
    out.append(KernelCase("_split_bwd N4", "_split_bwd", "triton_mhc", bwd_sig, const, 4, 1, forward=False))
    return out


def compile_case(case: KernelCase, workdir: Path) -> KernelReport:
    """Compile one case for sm_90 and read its resource usage; raises on a compiler error."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from v4train.kernels import triton_module

    fn = getattr(triton_module(case.module, interpret=False), case.kernel)
    sig = dict(case.signature)
    sig.update({k: "constexpr" for k in case.constexprs})
    log = io.StringIO()
    started = time.perf_counter()
    with _env(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(fn, sig, dict(case.constexprs)), target=GPUTarget("cuda", ARCH, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages, "enable_fp_fusion": True},
        )
    seconds = time.perf_counter() - started
    ptxas = _ptxas_figures(log.getvalue(), case.kernel)
    cubin = workdir / f"{re.sub(r'[^A-Za-z0-9_]+', '_', case.name)}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = _resource_usage(cubin, case.kernel)
    if usage["REG"] != ptxas["registers"]:
        raise RuntimeError(f"{case.name}: cuobjdump reports {usage['REG']} registers, ptxas {ptxas['registers']}")
    return KernelReport(case, usage["REG"], ptxas["spill_stores"], ptxas["spill_loads"], ptxas["stack"],
                        usage["LOCAL"], int(compiled.metadata.shared), seconds)


def _ptxas_figures(log: str, kernel: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes of ``kernel`` from a ``ptxas -v`` log."""
    part = log.split(f"Function properties for {kernel}", 1)
    if len(part) != 2:
        raise RuntimeError(f"no ptxas -v figures for {kernel} in the compile log:\n{log}")
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", part[1])
    regs = re.search(r"Used (\d+) registers", part[1])
    if frame is None or regs is None:
        raise RuntimeError(f"unreadable ptxas -v figures for {kernel}:\n{part[1][:500]}")
    return {"stack": int(frame[1]), "spill_stores": int(frame[2]), "spill_loads": int(frame[3]),
            "registers": int(regs[1])}


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of the block (Triton's knobs read them on access)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _resource_usage(cubin: Path, kernel: str) -> dict[str, int]:
    """REG / LOCAL / STACK of ``kernel`` from ``cuobjdump --dump-resource-usage``."""
    text = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    block = text.split(f"Function {kernel}:", 1)
    if len(block) != 2:
        raise RuntimeError(f"cuobjdump lists no function {kernel} in {cubin}:\n{text}")
    fields = dict(re.findall(r"(\w+):(\d+)", block[1].split("Function", 1)[0]))
    return {key: int(fields.get(key, 0)) for key in ("REG", "LOCAL", "STACK")}


def _tool(name: str) -> Path:
    """A CUDA binary bundled with the triton wheel (``triton/backends/nvidia/bin``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: the triton wheel should bundle {name}")
    return path


def run(full: bool = False) -> list[KernelReport]:
    """Compile every case; returns the reports (raises on the first kernel that fails to compile)."""
    with tempfile.TemporaryDirectory(prefix="v4train-sm90-") as tmp:
        return [compile_case(case, Path(tmp)) for case in cases(full)]


def format_table(reports: list[KernelReport]) -> str:
    """A fixed-width table: kernel, warps/stages, registers, spill stores/loads, stack, shared memory."""
    lines = [f"{'kernel (sm_90)':<34} {'warps':>5} {'stages':>6} {'regs':>5} {'spill st/ld B':>13} "
             f"{'stack B':>7} {'smem KiB':>8} {'compile s':>9}"]
    for r in reports:
        spill = f"{r.spill_store_bytes}/{r.spill_load_bytes}"
        lines.append(f"{r.case.name:<34} {r.case.num_warps:>5} {r.case.num_stages:>6} {r.registers:>5} "
                     f"{spill:>13} {r.stack_bytes:>7} {r.shared_bytes / 1024:>8.1f} {r.seconds:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table; exit 1 if a forward kernel spills or a kernel exceeds sm_90 limits."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also compile the small test shapes")
    args = parser.parse_args(argv)
    reports = run(args.full)
    print(format_table(reports))
    bad = problems(reports)
    for line in bad:
        print("FAIL:", line)
    return 1 if bad else 0


def problems(reports: list[KernelReport]) -> list[str]:
    """Violations: spills in forward kernels; shared memory or registers past the sm_90 limits."""
    out = []
    for r in reports:
        if r.case.forward and r.spills:
            out.append(f"{r.case.name} spills ({r.spill_store_bytes} B stores, {r.spill_load_bytes} B loads, "
                       f"{r.local_bytes} B local per thread)")
        if r.shared_bytes > HOPPER_SMEM_BYTES:
            out.append(f"{r.case.name} needs {r.shared_bytes} B shared memory (> {HOPPER_SMEM_BYTES})")
        if r.registers > HOPPER_REGS:
            out.append(f"{r.case.name} uses {r.registers} registers")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
