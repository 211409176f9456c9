"""Nsight Compute profile of the kernels the H100 run of 2026-11-26 left furthest from the roofline.

Each case launches its kernels once between cudaProfilerStart and cudaProfilerStop, after a warm-up
outside that window (Triton compiles and tile picks happen there), so

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section LaunchStats --section WarpStateStats \\
        python3 scripts/gpu_profile.py > ncu.txt

reports each profiled kernel once, in the order of the cases this script prints first (the case
names and their kernels' order go to stderr as well, so the report can be read against them).
scripts/gpu_check.sh runs it with PROFILE=1. Needs a GPU; bf16, channels_last, batch 128, the
SPEC section 6 shapes, as the benchmarks.

    python3 scripts/gpu_profile.py --list     # the cases, without a GPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def cases(device: str = "cuda", dtype=torch.bfloat16, N: int = 128) -> list[tuple[str, str, object]]:
    """(name, what to look for, a function launching the case's kernels)."""
    import falconnet_kernels as fk
    from falconnet.layers import SFConv2d

    out = []

    def sf(C_in, C_out, H):
        layer = SFConv2d(C_in, C_out)
        w1 = layer.weight1.detach().to(device, dtype)
        w2 = layer.weight2.detach().to(device, dtype)
        x = _cl(torch.randn(N, C_in, H, H, device=device, dtype=dtype))
        wd = _cl(fk.sf_conv_dense_weight(w1, w2)[:, :, None, None])
        gy = _cl(torch.randn(N, C_out, H, H, device=device, dtype=dtype))
        return x, w1, w2, wd, gy

    for C_in, C_out, H in ((1024, 256, 7), (128, 512, 14), (128, 32, 56)):
        x, w1, w2, wd, gy = sf(C_in, C_out, H)
        tag = f"{C_in}->{C_out}@{H}"
        out.append((f"sf_conv fwd {tag} triton (composed GEMM)", "compose kernel, then _sf_gemm_fwd_kernel",
                    lambda x=x, w1=w1, w2=w2: fk.sf_conv(x, w1, w2)))
        out.append((f"dense 1x1 fwd {tag} (cuDNN)", "cuDNN's kernel(s)", lambda x=x, wd=wd: F.conv2d(x, wd)))
        out.append((f"sf_conv bwd {tag} triton (composed GEMM), relu", "compose (split), GEMM+mask, compose, "
                    "GEMM grad_x, cuBLAS grad_W, chain-rule einsums, bias sum",
                    lambda x=x, w1=w1, w2=w2, gy=gy: torch.ops.falconnet.sf_conv_backward(gy, x, w1, w2, None, "relu")))
    for C, H in ((128, 56), (1024, 7)):
        x = _cl(torch.randn(N, C, H, H, device=device, dtype=dtype))
        w = torch.randn(C, 1, 3, 3, device=device, dtype=dtype)
        b = torch.randn(C, device=device, dtype=dtype)
        gy = _cl(torch.randn(N, C, H, H, device=device, dtype=dtype))
        tag = f"{C}@{H}"
        for name in ("triton", "cuda"):
            out.append((f"dw_conv3x3 fwd {tag} {name}", "one stencil kernel",
                        lambda x=x, w=w, b=b, name=name: _forced(name, fk.dw_conv3x3, x, w, b, 1, "relu")))
            out.append((f"dw_conv3x3 bwd {tag} {name}", "weight-gradient kernel(s), input-gradient kernel",
                        lambda x=x, w=w, b=b, gy=gy, name=name: _forced(
                            name, torch.ops.falconnet.dw_conv3x3_backward, gy, x, w, b, 1, "relu")))
        out.append((f"depthwise fwd {tag} (cuDNN)", "cuDNN's kernel(s)",
                    lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1, groups=x.shape[1])))
    # RepSO's one-conv training node at K = 3, piece by piece (H100 2026-11-27: 6.9x the seven
    # branches at 1024@7, where the two fold kernels take 69 us of 256 and the moments kernel
    # runs at 5% of copy). Built on first use (the warm-up), so --list needs no GPU.
    for C, H in ((1024, 7), (128, 56)):
        built = {}

        def piece(name, C=C, H=H, built=built):
            if not built:
                if BENCHMARKS not in sys.path:
                    sys.path.insert(0, BENCHMARKS)
                from common import repso_node_parts  # benchmarks/common.py

                built.update(repso_node_parts(C, H, N, dtype, device)[1])
            return built[name]()

        for name, what in (("moments", "row kernel (54 sums a channel) + float64 reduction"),
                           ("fold", "one fold kernel, float64"), ("fold-bwd", "one fold backward kernel, float64"),
                           ("conv-rows", "row conv kernel"), ("conv-wgrad-rows", "row weight-gradient kernel + reduction"),
                           ("grad-x", "grad_x row kernel")):
            out.append((f"repso node {name} {C}@{H}", what, lambda name=name, piece=piece: piece(name)))
    return out


def _forced(name, fn, *args):
    from falconnet_kernels import _backend

    with _backend.forcing(name):
        return fn(*args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    parser.add_argument("-k", default="", help="only the cases whose name contains this text")
    args = parser.parse_args(argv)
    if args.list:
        for name, what, _ in cases(device="meta"):
            if args.k in name:
                print(f"{name}: {what}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_profile: no GPU visible (this script profiles CUDA kernels)", file=sys.stderr)
        return 2
    chosen = [c for c in cases() if args.k in c[0]]
    for _, _, fn in chosen:  # warm-up: compiles, tile picks, cuDNN's heuristics
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, what, fn in chosen:
        print(f"[gpu_profile] case: {name} ({what})", file=sys.stderr, flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
