"""Side-by-side CPU timing of the fused SF-Conv op against the dense 1x1 conv it replaces.

Quick tuning aid for the C++ kernels (the pytest-benchmark files in benchmarks/ are the record):
the 8 point-wise shapes of SPEC section 6 at batch 16, float32, NCHW and channels_last, with the
default SF-Conv config r = 1, k = the valid k nearest sqrt(r*C_out). Prints time (fastest of
interleaved runs), GB/s of the minimum traffic (C_in + C_out) * 4 bytes per pixel, and speedup.

    python scripts/cpu_kernel_timing.py [--batch 16] [--threads 2] [--rounds 15] [--backward]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import falconnet_kernels as fk

SHAPES = [(32, 128, 56), (128, 32, 56), (64, 256, 28), (256, 64, 28), (128, 512, 14), (512, 128, 14), (256, 1024, 7), (1024, 256, 7)]


def default_k(C_in: int, C_out: int, r: int = 1) -> int:
    target = math.sqrt(r * C_out)
    valid = [k for k in range(r, C_in + 1) if C_in % k == 0 and k % r == 0 and C_out % (k // r) == 0]
    return min(valid, key=lambda k: (abs(k - target), k))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--layouts", default="channels_last,nchw")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, float32, "
          f"{'forward+backward' if args.backward else 'forward'}")
    print(f"{'layout':<14}{'C_in->C_out':>12}{'HxW':>6}{'k,c_h,G,m':>14}{'dense ms':>10}{'sf ms':>9}"
          f"{'dense GB/s':>11}{'sf GB/s':>9}{'speedup':>9}")
    for layout in args.layouts.split(","):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        speedups = []
        for C_in, C_out, hw in SHAPES:
            k = default_k(C_in, C_out)
            c_h, G = k, C_in // k
            m = C_out // c_h
            x = torch.randn(args.batch, C_in, hw, hw).contiguous(memory_format=fmt)
            w1 = torch.randn(G, c_h, k) / math.sqrt(k)
            w2 = torch.randn(c_h, m, G) / math.sqrt(G)
            wd = fk.sf_conv_dense_weight(w1, w2).reshape(C_out, C_in, 1, 1).contiguous(memory_format=fmt)
            if args.backward:
                xg, w1g, w2g, wdg = (t.detach().requires_grad_() for t in (x, w1, w2, wd))
                gy = torch.randn(args.batch, C_out, hw, hw).contiguous(memory_format=fmt)

                def dense():
                    F.conv2d(xg, wdg).backward(gy)

                def sf():
                    fk.sf_conv(xg, w1g, w2g).backward(gy)
            else:
                def dense():
                    F.conv2d(x, wd)

                def sf():
                    fk.sf_conv(x, w1, w2)
            with torch.no_grad() if not args.backward else torch.enable_grad():
                for _ in range(3):
                    dense()
                    sf()
                td, ts = [], []
                for _ in range(args.rounds):  # interleaved, so both see the same machine load
                    td.append(timed(dense))
                    ts.append(timed(sf))
            # min, not median: on a shared machine the slow runs are other processes, not the kernel
            t_dense, t_sf = min(td), min(ts)
            nbytes = args.batch * hw * hw * (C_in + C_out) * 4 * (2 if args.backward else 1)
            speedups.append(t_dense / t_sf)
            print(f"{layout:<14}{f'{C_in}->{C_out}':>12}{hw:>6}{f'{k},{c_h},{G},{m}':>14}{t_dense * 1e3:>10.3f}"
                  f"{t_sf * 1e3:>9.3f}{nbytes / t_dense / 1e9:>11.1f}{nbytes / t_sf / 1e9:>9.1f}{t_dense / t_sf:>8.2f}x")
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        print(f"{layout}: geomean speedup {geo:.2f}x, min {min(speedups):.2f}x")


if __name__ == "__main__":
    main()
