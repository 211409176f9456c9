"""`falconnet bench`: read a pytest-benchmark JSON of benchmarks/, print the table, write a chart.

Every row: median and minimum time, achieved GB/s (the op's minimum bytes over the median), that as a share of
the plain copy measured in the same run, and the speedup over the baseline measured in the same
run (dense 1x1 conv for sf_conv, PyTorch's depthwise conv for dw_conv3x3). CPU runs also carry a
paired speedup: the op and its baseline called alternately within one case (benchmarks/common.py:
paired_times), which a machine whose speed drifts between cases does not skew.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections import defaultdict

BASELINE = {
    "sf_conv": "dense",
    "dw_conv3x3": "torch-dw",
    "model": "resnet18",
    "repso_train": "seven-branch",
    "falconnet_train_step": "seven-branch",
    "refco_train": "refco-branches",
    "falconnet_train_step_refco": "refco-branches",
    "bn_act_train": "bn-then-relu6",
    "repso_act_train": "node-then-relu6",
}


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s) (pytest benchmarks/ --benchmark-json=FILE)")
    parser.add_argument("--png", default=None, help="write a bar chart of the speedups to this PNG file")
    parser.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")


def load_rows(path: str) -> tuple[list[dict], dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"falconnet bench: results file {path!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"falconnet bench: {path!r} is not a pytest-benchmark JSON file ({exc})") from None
    if "benchmarks" not in data:
        raise SystemExit(f"falconnet bench: {path!r} has no 'benchmarks' list; is it pytest-benchmark output?")
    rows = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info") or {})
        if "op" not in info:
            continue
        info.setdefault("pass", "step")
        info.setdefault("shape", "-")
        info.setdefault("layout", None)
        if "cpu_threads" in info:  # the same case timed at several thread counts
            info["layout"] = f"{info['layout'] or ''} {info['cpu_threads']} thread(s)".strip()
        info["median_s"] = b["stats"]["median"]
        info["min_s"] = b["stats"]["min"]
        paired = info.get("paired") or {}
        info["paired_speedup"] = (paired["baseline_median_s"] / paired["median_s"]
                                  if paired.get("median_s") and paired.get("baseline_median_s") else None)
        info["gbps"] = info["bytes_min"] / info["median_s"] / 1e9 if info.get("bytes_min") else None
        rows.append(info)
    return rows, data.get("machine_info", {})


def analyse(rows: list[dict]) -> dict:
    """Speedups over the baseline and shares of the copy roofline, per op and pass."""
    copy = [r for r in rows if r["op"] == "copy"]
    copy_gbps = max((r["gbps"] for r in copy), default=None)
    keyed = defaultdict(dict)
    for r in rows:
        if r["op"] != "copy":
            keyed[(r["op"], r["pass"], r["device"], r.get("layout"), r["shape"])][r["impl"]] = r
    tables = defaultdict(list)
    for (op, pas, device, layout, shape), impls in keyed.items():
        base = impls.get(BASELINE.get(op))
        for impl, r in sorted(impls.items()):
            r = dict(r)
            r["speedup"] = base["median_s"] / r["median_s"] if base else None
            r["copy_share"] = r["gbps"] / copy_gbps if copy_gbps and r["gbps"] else None
            tables[(op, pas, device, layout)].append(r)
    geomeans, paired_geomeans = {}, {}
    for key, rs in tables.items():
        per_impl, per_impl_paired = defaultdict(list), defaultdict(list)
        for r in rs:
            if r["speedup"]:
                per_impl[r["impl"]].append(r["speedup"])
            if r.get("paired_speedup"):
                per_impl_paired[r["impl"]].append(r["paired_speedup"])
        geomeans[key] = {i: _geomean(v) for i, v in per_impl.items()}
        paired_geomeans[key] = {i: _geomean(v) for i, v in per_impl_paired.items()}
    return {"copy_gbps": copy_gbps, "tables": tables, "geomeans": geomeans, "paired_geomeans": paired_geomeans}


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def _per_shape(rows: list[dict], op: str, pass_: str, device: str = "cuda") -> dict:
    """{(layout, shape): {impl: median seconds}} for one op and pass on one device."""
    out = defaultdict(dict)
    for r in rows:
        if r["op"] == op and r["pass"] == pass_ and r.get("device") == device:
            out[(r.get("layout"), r["shape"])][r["impl"]] = r["median_s"]
    return out


def _backward_times(rows: list[dict], op: str) -> dict:
    """Backward-only estimates per shape and impl: the fwd+bwd median minus the forward median."""
    fwd, both = _per_shape(rows, op, "fwd"), _per_shape(rows, op, "fwd+bwd")
    return {key: {impl: t - fwd[key][impl] for impl, t in impls.items() if impl in fwd.get(key, {})}
            for key, impls in both.items()}


def backend_choices(rows: list[dict]) -> list[str]:
    """What a GPU run says about falconnet_kernels' defaults: per op and pass the faster of the CUDA
    C++ and Triton backends (geomean over the shapes; the backward from fwd+bwd minus fwd), the
    SF-Conv shapes where the composed-weight GEMM beats the two-stage Triton kernel (entries for
    triton_sf_gemm.COMPOSED), and RepSO's conv and its weight-gradient kernel (repso_train.CONV,
    WEIGHT_GRAD)."""
    lines = []
    for op in ("sf_conv", "dw_conv3x3"):
        for name, table in (("forward", _per_shape(rows, op, "fwd")), ("backward", _backward_times(rows, op))):
            pairs = [(t["falconnet-cuda"], t["falconnet-triton"]) for t in table.values()
                     if t.get("falconnet-cuda", 0) > 0 and t.get("falconnet-triton", 0) > 0]
            if pairs:
                ratio = _geomean([c / t for c, t in pairs])  # > 1: Triton faster
                best = "triton" if ratio > 1 else "cuda"
                lines.append(f"_backend.CUDA_DEFAULT[({op!r}, {name!r})] = {best!r}   "
                             f"# Triton {ratio:.2f}x the CUDA C++ speed, geomean of {len(pairs)} shapes")
    faster, slower = [], []  # (C_in, C_out, pass) where the composed GEMM beats / trails the two-stage kernel
    for name, table in (("forward", _per_shape(rows, "sf_conv", "fwd")), ("backward", _backward_times(rows, "sf_conv"))):
        for (_, shape), t in sorted(table.items(), key=lambda kv: _shape_key(kv[0][1])):
            # runs before the GEMM form was routed timed the two-stage kernel as "falconnet-triton"
            gemm, two_stage = t.get("falconnet-triton-gemm"), t.get("falconnet-triton-two-stage",
                                                                    t.get("falconnet-triton"))
            if gemm and two_stage and gemm > 0 and two_stage > 0:
                c_in, c_out = (int(v) for v in shape.split("@")[0].split("->"))
                entry = f"({c_in}, {c_out}, {name!r})  # {two_stage / gemm:.2f}x the two-stage kernel"
                (faster if gemm < two_stage else slower).append(entry)
    if faster or slower:
        lines.append(f"triton_sf_gemm.COMPOSED: the composed GEMM is faster at {len(faster)} of "
                     f"{len(faster) + len(slower)} (shape, pass) pairs"
                     + ("; the two-stage kernel at: " + "; ".join(slower) if slower else ""))
    parts = _per_shape(rows, "repso_node_part", "fwd+bwd pieces")
    kernels = {"cudnn": "conv-wgrad", "triton": "conv-wgrad-triton", "rows": "conv-wgrad-rows"}
    timed = [t for t in parts.values() if t.get("conv-wgrad")]
    speed = {name: _geomean([t["conv-wgrad"] / t[part] for t in timed])  # > 1: faster than cuDNN
             for name, part in kernels.items() if timed and all(t.get(part) for t in timed)}
    if len(speed) > 1:
        best = max(speed, key=speed.get)
        others = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in speed.items() if name != "cudnn")
        lines.append(f"repso_train.WEIGHT_GRAD = {best!r}   # speed vs cuDNN's depthwise weight gradient: "
                     f"{others}, geomean of {len(timed)} shapes")
    pairs = [(t["conv"], t["conv-rows"]) for t in parts.values() if t.get("conv") and t.get("conv-rows")]
    if pairs:
        ratio = _geomean([c / r for c, r in pairs])
        lines.append(f"repso_train.CONV = {'rows' if ratio > 1 else 'cudnn'!r}   "
                     f"# the row kernel {ratio:.2f}x cuDNN's depthwise conv, geomean of {len(pairs)} shapes")
    # RefCO's statistics route on the GPU: refco-fused runs STATS = "auto" (the full covariance
    # there), refco-fused-groups the per-group forms
    refco = {shape: t for (_, shape), t in _per_shape(rows, "refco_train", "fwd+bwd").items()
             if t.get("refco-fused") and t.get("refco-fused-groups")}
    if refco:
        ratios = {shape: t["refco-fused-groups"] / t["refco-fused"] for shape, t in refco.items()}  # > 1: gram faster
        slower = [f"{shape} {r:.2f}x" for shape, r in sorted(ratios.items(), key=lambda kv: _shape_key(kv[0])) if r < 1]
        lines.append(f"refco_train.STATS on the GPU: the full covariance {_geomean(list(ratios.values())):.2f}x the "
                     f"per-group route's speed, geomean of {len(ratios)} shapes"
                     + ("; slower at: " + ", ".join(slower) if slower else "; faster at every shape"))
    return lines


def render(analysis: dict, machine: dict) -> str:
    env = machine.get("falconnet", {})
    lines = [
        f"device: {env.get('gpu') or machine.get('cpu', {}).get('brand_raw', 'cpu')}; torch {env.get('torch')}, "
        f"triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; date {env.get('date')}",
    ]
    if analysis["copy_gbps"]:
        lines.append(f"plain copy (roofline, same run): {analysis['copy_gbps']:.0f} GB/s")
    for key in sorted(analysis["tables"], key=str):
        op, pas, device, layout = key
        pgm = analysis["paired_geomeans"].get(key)  # non-empty when any row of the table was paired
        header = ["shape", "impl", "median us", "min us", "GB/s", "% copy", _speedup_header(op)]
        header += ["paired speedup"] if pgm else []
        lines += ["", f"## {op} {pas} on {device}" + (f", {layout}" if layout else ""), "",
                  "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        for r in sorted(analysis["tables"][key], key=lambda r: (_shape_key(r["shape"]), r["impl"])):
            cells = [r["shape"], r["impl"], f"{1e6 * r['median_s']:.1f}", f"{1e6 * r['min_s']:.1f}",
                     f"{r['gbps']:.0f}" if r["gbps"] else "-",
                     f"{100 * r['copy_share']:.0f}" if r["copy_share"] else "-",
                     f"{r['speedup']:.2f}x" if r["speedup"] else "-"]
            if pgm:
                cells.append(f"{r['paired_speedup']:.2f}x" if r.get("paired_speedup") else "-")
            lines.append("| " + " | ".join(cells) + " |")
        gm = analysis["geomeans"][key]
        if gm:
            lines.append("")
            lines.append("geomean speedup: " + ", ".join(f"{i} {v:.2f}x" for i, v in sorted(gm.items())))
        if pgm:
            lines.append("geomean paired speedup (op and baseline alternated in one case): "
                         + ", ".join(f"{i} {v:.2f}x" for i, v in sorted(pgm.items())))
    return "\n".join(lines)


def _speedup_header(op: str) -> str:
    # ops measured without a baseline (the pieces of one path) have no speedup column to fill
    return f"speedup vs {BASELINE[op]}" if op in BASELINE else "speedup"


def _shape_key(shape: str):
    """Sort '32->128@56', '128@56' and free-form shapes: numbers first, in order."""
    import re

    return tuple(int(v) for v in re.findall(r"\d+", shape)) or (0,)


def write_png(analysis: dict, path: str) -> bool:
    """A bar chart of every table's speedups; False (nothing written) when no table has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # only the tables with a baseline have speedups to draw
    keys = sorted((k for k in analysis["tables"] if any(r["speedup"] for r in analysis["tables"][k])), key=str)
    if not keys:
        return False
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.2 * max(1, len(keys))), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = [r for r in analysis["tables"][key] if r["speedup"]]
        shapes = sorted({r["shape"] for r in rows}, key=_shape_key)
        impls = sorted({r["impl"] for r in rows})
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            vals = [next((r["speedup"] for r in rows if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=impl)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel("speedup")
        ax.set_title(" ".join(str(k) for k in key), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)  # atomic: a crash leaves the old chart, never half a file
    return True


def run(args) -> int:
    rows, machine = [], {}
    for path in args.results:
        more, machine = load_rows(path)
        rows += more
    if not rows:
        print(f"falconnet bench: {' '.join(args.results)} hold no falconnet benchmark rows", file=sys.stderr)
        return 1
    analysis = analyse(rows)
    text = render(analysis, machine)
    choices = backend_choices(rows)
    if choices:  # a GPU run: what it says about the backend defaults
        text += "\n\n## backend choices this run supports\n\n" + "\n".join(choices)
    print(text)
    if args.markdown:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.markdown)))
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.markdown)
    if args.png:
        if write_png(analysis, args.png):
            print(f"chart written to {args.png}")
        else:
            print(f"falconnet bench: no speedups to chart, {args.png} not written", file=sys.stderr)
    return 0
