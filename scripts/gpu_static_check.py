#!/usr/bin/env python3
"""Static GPU resource check (no GPU needed): registers, spills, local memory and theoretical
occupancy on sm_90 of every CUDA kernel instantiation (csrc/cuda/*.cu, compiled by nvcc with the
flags of the real build) and of the Triton kernels (their sm_90 cubins, read with the cuobjdump
that the Triton wheel ships). The table is committed as docs/gpu_resources.md.

    python scripts/gpu_static_check.py --write   # regenerate docs/gpu_resources.md
    python scripts/gpu_static_check.py --check   # fail when it is stale, or on an undocumented spill

--check fails on: spill stores/loads, a stack frame or local memory in any kernel not listed in
ALLOWED_LOCAL with its reason; a table that differs from what the sources compile to. Run it with
a Python whose torch is a CUDA build (its headers) and nvcc on PATH (.ci/run step 5), or give
--torch-include <torch/include of a CUDA build>.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "gpu_resources.md"
ARCH = "sm_90"

# sm_90 limits (CUDA C Programming Guide, compute capability 9.0): per SM 2048 threads, 32 blocks,
# 64 K 32-bit registers in 4 partitions, registers allocated per warp in units of 256, 228 KB of
# shared memory of which 1 KB is reserved per block.
SM_THREADS, SM_BLOCKS, SM_REGS, REG_UNIT, SM_SMEM, SMEM_RESERVED = 2048, 32, 65536, 256, 233472, 1024

# Kernels allowed a stack frame / local memory, with why (a regex on the shortened name).
ALLOWED_LOCAL: dict[str, str] = {
    # masks.cu: the thread at a group's start ranks its <= 32 keys from a per-thread array indexed
    # by loop counters with a runtime bound (the group may be short), which lives in local memory:
    # 128 B (256 B for fp64 keys) per thread, in L1. nm_mask runs once per mask update, not per step.
    r"NmFunctor<": "per-thread key array of a group (kMaxGroup = 32 keys)",
}

# Threads per block of each CUDA kernel (csrc/cuda): kBlockSize = 512, the radix pick one thread.
def cuda_block_size(name: str) -> int:
    return 1 if name.startswith("radix_select_kernel") else 512


TRITON_THREADS = 4 * 32  # sam_kernels/ops/backends/triton/_tables.py: NUM_WARPS = 4


def occupancy(regs: int, threads: int, smem: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's 2048 threads) for a block of ``threads``."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    warps_by_regs = (SM_REGS // 4 // per_warp) * 4  # each of the 4 partitions holds whole warps
    by_regs = warps_by_regs // warps
    by_smem = SM_SMEM // (smem + SMEM_RESERVED)
    blocks = min(SM_THREADS // (warps * 32), SM_BLOCKS, by_regs, by_smem)
    return blocks, blocks * warps * 32 / SM_THREADS


def shorten(name: str) -> str:
    name = name.removeprefix("void ")
    for ns in ("sam_kernels::cuda::(anonymous namespace)::", "sam_kernels::cuda::", "c10::"):
        name = name.replace(ns, "")
    name = re.sub(r"\(.*\)$", "", name)  # parameter list
    return name.replace("> >", ">>").replace("> >", ">>")


def _torch_includes(override: str | None) -> list[str]:
    if override:
        base = Path(override)
        return [str(base), str(base / "torch" / "csrc" / "api" / "include")]
    from torch.utils import cpp_extension
    return cpp_extension.include_paths()


def _nvcc_flags() -> list[str]:
    from torch.utils import cpp_extension
    return cpp_extension.COMMON_NVCC_FLAGS


def cuda_rows(torch_include: str | None, jobs: int) -> list[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("gpu_static_check: nvcc not on PATH")
    inc = [f"-I{p}" for p in _torch_includes(torch_include)] + [f"-I{sysconfig.get_paths()['include']}"]
    # setup.py's nvcc flags (-O3, torch's common flags), device code only, for sm_90.
    base = [nvcc, "-std=c++20", "-O3", "-cubin", f"-arch={ARCH}", "--resource-usage", "-Xptxas",
            "-warn-spills,-warn-lmem-usage", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    base += _nvcc_flags() + inc
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

    def compile_one(src: Path) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(base + [str(src), "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"gpu_static_check: nvcc failed on {src}:\n{r.stderr[-8000:]}")
        return r.stdout + r.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        outputs = list(pool.map(compile_one, sources))
    rows = []
    for src, out in zip(sources, outputs):
        mangled, props = None, {}
        for line in out.splitlines():
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                mangled, props = m.group(1), {}
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and mangled:
                props.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
                continue
            m = re.search(r"Used (\d+) registers(.*)", line)
            if m and mangled:
                smem = re.search(r"(\d+) bytes smem", m.group(2))
                lmem = re.search(r"(\d+) bytes lmem", m.group(2))
                props.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0,
                             lmem=int(lmem.group(1)) if lmem else 0)
                rows.append(dict(file=src.name, mangled=mangled, **props))
                mangled = None
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for r, n in zip(rows, names):
        r["kernel"] = shorten(n)
        r["threads"] = cuda_block_size(r["kernel"])
    return rows


# The Triton kernels and the constexpr configurations compiled (as tests/ops/test_triton.py's
# native-compilation check): fp32 and the widest variants of each.
def _triton_configs():
    import triton.language as tl
    from sam_kernels.ops.backends.triton import _tables, masks, norm, optimizer_steps, perturb, variants

    c = dict(DT=tl.float32, CDT=tl.float32, BLOCK=1024, CHUNK=8192, ALIGNED=True)
    sgd = dict(HAS_WD=True, HAS_MOMENTUM=True, INIT_BUFFERS=False, NESTEROV=True, MAXIMIZE=True, HAS_SCALE=True,
               HAS_FOUND=True, HAS_OUT=False, CHECK=False)
    check = dict(sgd, HAS_OUT=True, CHECK=True)
    adamw = dict(MAXIMIZE=True, HAS_SCALE=True, HAS_FOUND=True)
    pert = dict(MASKED=True, ADAPTIVE=True, KEEP=True, INTO=False)
    return [
        ("sq_norm_partials fp32 adaptive masked", norm._sq_norm_partials_kernel, dict(c, ADAPTIVE=True, MASKED=True)),
        ("dot_partials fp32", norm._dot_partials_kernel, c),
        ("sum_partials", norm._sum_partials_kernel, dict(BLOCK=1024)),
        ("perturb fp32 all", perturb._perturb_kernel, dict(c, **pert, PERTURBATION_SQ=False, GRAD_COPIES=False)),
        ("perturb fp32 into backups", perturb._perturb_kernel, dict(c, MASKED=False, ADAPTIVE=False, KEEP=False,
                                                                     INTO=True, PERTURBATION_SQ=False,
                                                                     GRAD_COPIES=False)),
        ("perturb fp32 all +sq +copies", perturb._perturb_kernel, dict(c, **pert, PERTURBATION_SQ=True,
                                                                        GRAD_COPIES=True)),
        ("perturb bf16 all +sq +copies", perturb._perturb_kernel, dict(c, DT=tl.bfloat16, **pert, PERTURBATION_SQ=True,
                                                                        GRAD_COPIES=True)),
        ("perturb fp64 all +sq +copies", perturb._perturb_kernel, dict(c, DT=tl.float64, CDT=tl.float64, **pert,
                                                                        PERTURBATION_SQ=True, GRAD_COPIES=True)),
        ("copy bf16", perturb._copy_kernel, dict(DT=tl.bfloat16, BLOCK=1024, CHUNK=8192, ALIGNED=True)),
        ("sgd fp32", optimizer_steps._sgd_restore_step_kernel, dict(c, **sgd, SUMS=False, HAS_ASCENT=False)),
        ("sgd fp32 +sums", optimizer_steps._sgd_restore_step_kernel, dict(c, **sgd, SUMS=True, HAS_ASCENT=True)),
        ("sgd bf16 +sums", optimizer_steps._sgd_restore_step_kernel, dict(c, DT=tl.bfloat16, **sgd, SUMS=True,
                                                                          HAS_ASCENT=True)),
        ("sgd fp32 +check", optimizer_steps._sgd_restore_step_kernel, dict(c, **check, SUMS=False, HAS_ASCENT=False)),
        ("sgd fp32 +check +sums", optimizer_steps._sgd_restore_step_kernel, dict(c, **check, SUMS=True,
                                                                                 HAS_ASCENT=True)),
        ("sgd undo fp32", optimizer_steps._sgd_undo_kernel, dict(c, HAS_FOUND=True, HAS_NEW=True, HAS_OLD=True)),
        ("adamw fp32", optimizer_steps._adamw_restore_step_kernel, dict(c, **adamw, SUMS=False, HAS_ASCENT=False)),
        ("adamw fp32 +sums", optimizer_steps._adamw_restore_step_kernel, dict(c, **adamw, SUMS=True, HAS_ASCENT=True)),
        ("adamw bf16 +sums", optimizer_steps._adamw_restore_step_kernel, dict(c, DT=tl.bfloat16, **adamw, SUMS=True,
                                                                              HAS_ASCENT=True)),
        ("adamw fp64 +sums", optimizer_steps._adamw_restore_step_kernel, dict(c, DT=tl.float64, CDT=tl.float64, **adamw,
                                                                              SUMS=True, HAS_ASCENT=True)),
        ("renormalize fp32", variants._renormalize_kernel, c),
        ("fisher_accumulate fp32", variants._fisher_accumulate_kernel, c),
        ("looksam_store fp32", variants._looksam_store_kernel, c),
        ("looksam_apply fp32", variants._looksam_apply_kernel, c),
        ("mix fp32", variants._mix_kernel, c),
        ("centralize fp32", variants._centralize_kernel, dict(DT=tl.float32, CDT=tl.float32, BLOCK=1024)),
        ("centralize fp64", variants._centralize_kernel, dict(DT=tl.float64, CDT=tl.float64, BLOCK=1024)),
        ("add_partials width 2", _tables.add_partials_kernel, dict(WIDTH=2, USED=2, BLOCK=1024)),
        ("order_keys fp16", masks._order_keys_kernel, dict(DT=tl.float16, BLOCK=1024, CHUNK=8192, ALIGNED=False)),
        ("nm_mask bf16 4", masks._nm_mask_kernel, dict(DT=tl.bfloat16, M=4, MP=4, GROUPS=256, ALIGNED=True)),
        ("radix_histogram", masks._radix_histogram_kernel, dict(BLOCK=1024, CHUNK=8192)),
        ("radix_select", masks._radix_select_kernel, {}),
        ("tie_count", masks._tie_count_kernel, dict(BLOCK=1024, CHUNK=8192)),
        ("topk_keep", masks._topk_keep_kernel, dict(BLOCK=1024, CHUNK=8192)),
    ]


_SCALARS = {"partials": "*fp32", "out": "*fp32", "sq_norm": "*fp32", "ref_sq_norm": "*fp32", "gs_dot_g": "*fp32",
            "g_sq_norm": "*fp32", "gv_sq_norm": "*fp32", "n": "i32", "keep_threshold": "i32", "hist": "*i32",
            "keep": "*i8", "shift": "i32", "high_mask": "i64", "flip": "i32", "scale_ptr": "*fp32",
            "found_ptr": "*fp32", "sums": "*fp64", "flag_ptr": "*fp32"}


def triton_rows() -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sam_kernels.ops.backends.triton._tables import FP_FUSION

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for label, fn, cx in _triton_configs():
        sig = {p.name: "constexpr" if p.name in cx else p.annotation_type or _SCALARS.get(p.name, "*i64")
               for p in fn.params}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": TRITON_THREADS // 32, "enable_fp_fusion": FP_FUSION})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if m is None:
            raise SystemExit(f"gpu_static_check: no resource usage for {label}:\n{out}")
        rows.append(dict(kernel=label, regs=int(m.group(1)), stack=int(m.group(2)), smem=int(m.group(3)),
                         lmem=int(m.group(4)), spill_st=0, spill_ld=0, threads=TRITON_THREADS))
    return rows


HEADER = """# GPU resources on sm_90 (generated)

Written by `python scripts/gpu_static_check.py --write`; `--check` (CI, `.ci/run` step 5) fails
when this file no longer matches what the sources compile to, and on any spill, stack frame or
local memory that is not documented in the script's `ALLOWED_LOCAL`. Occupancy is theoretical: the
share of an SM's 2048 thread slots that resident blocks of the kernel's size can fill, limited by
registers (allocated per warp in units of 256, 64 K per SM in 4 partitions), shared memory and
the block limits of compute capability 9.0. See docs/verification.md for what it means for these
bandwidth-bound kernels.
"""


def versions() -> str:
    import triton
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return f"Compiled by nvcc ({nvcc}) and Triton {triton.__version__}; a new compiler may change the numbers.\n"


def render(cuda: list[dict], triton: list[dict]) -> str:
    def table(rows, with_file):
        head = "| kernel | " + ("file | " if with_file else "") + \
               "threads | registers | spill st/ld (B) | stack (B) | local (B) | shared (B) | blocks/SM | occupancy |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in sorted(rows, key=lambda r: (r.get("file", ""), r["kernel"])):
            blocks, occ = occupancy(r["regs"], r["threads"], r["smem"])
            lines.append(f"| `{r['kernel']}` | " + (f"{r['file']} | " if with_file else "") +
                         f"{r['threads']} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['stack']} | "
                         f"{r['lmem']} | {r['smem']} | {blocks} | {occ:.0%} |")
        return "\n".join(lines)

    return (HEADER + "\n" + versions() + f"\n## CUDA kernels (csrc/cuda, nvcc, {len(cuda)} instantiations)\n\n" + table(cuda, True) +
            f"\n\n## Triton kernels (sam_kernels/ops/backends/triton, {len(triton)} configurations)\n\n" + table(triton, False)
            + "\n")


def undocumented_local(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        if r["spill_st"] or r["spill_ld"] or r["stack"] or r["lmem"]:
            if not any(re.search(p, r["kernel"]) for p in ALLOWED_LOCAL):
                bad.append(f"{r['kernel']}: spill stores {r['spill_st']} B, loads {r['spill_ld']} B, stack "
                           f"{r['stack']} B, local {r['lmem']} B")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"regenerate {TABLE.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="fail when the table is stale or a kernel spills")
    ap.add_argument("--torch-include", help="torch/include of a CUDA build of torch (default: the running torch's)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    cuda = cuda_rows(args.torch_include, args.jobs)
    triton = triton_rows()
    text = render(cuda, triton)
    bad = undocumented_local(cuda + triton)
    for b in bad:
        print(f"gpu_static_check: undocumented spill/local memory: {b}", file=sys.stderr)
    if args.write:
        TABLE.write_text(text)
        print(f"gpu_static_check: wrote {TABLE.relative_to(ROOT)} ({len(cuda)} CUDA, {len(triton)} Triton kernels)")
    elif TABLE.read_text() != text:
        import difflib
        sys.stderr.writelines(difflib.unified_diff(TABLE.read_text().splitlines(True), text.splitlines(True),
                                                   str(TABLE.relative_to(ROOT)), "compiled now"))
        print(f"gpu_static_check: {TABLE.relative_to(ROOT)} is stale: run scripts/gpu_static_check.py --write",
              file=sys.stderr)
        return 1
    else:
        print(f"gpu_static_check: {TABLE.relative_to(ROOT)} up to date ({len(cuda)} CUDA, {len(triton)} Triton kernels)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
