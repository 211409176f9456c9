"""`falconnet bench` (falconnet/bench_report.py): the table and chart it makes of a pytest-benchmark
JSON, on a small synthetic file in the format benchmarks/ writes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from falconnet import bench_report


def _bench(op, impl, shape, median, bytes_min=None, pass_="fwd", **extra):
    info = {"op": op, "impl": impl, "shape": shape, "pass": pass_, "device": "cuda", "layout": "channels_last"}
    if bytes_min is not None:
        info["bytes_min"] = bytes_min
    info.update(extra)
    return {"name": f"{op}-{impl}-{shape}", "stats": {"median": median, "min": 0.9 * median}, "extra_info": info}


@pytest.fixture
def results(tmp_path):
    rows = [
        _bench("copy", "copy", "1 GB", 0.5, bytes_min=2e9),  # 4 GB/s: the roofline of this run
        _bench("sf_conv", "dense", "32->128@56", 4e-3, bytes_min=8e6),
        _bench("sf_conv", "falconnet-triton", "32->128@56", 2e-3, bytes_min=8e6),
        _bench("sf_conv", "dense", "128->32@56", 1e-3, bytes_min=2e6),
        _bench("sf_conv", "falconnet-triton", "128->32@56", 2e-3, bytes_min=2e6),
        # pieces of one path: no baseline, no bytes for some
        _bench("repso_node_part", "moments", "128@56", 1e-3, bytes_min=1e6, pass_="fwd+bwd pieces"),
        _bench("repso_node_part", "fold", "128@56", 1e-5, pass_="fwd+bwd pieces"),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": rows, "machine_info": {"falconnet": {"gpu": "Test GPU", "torch": "x"}}}))
    return path


def test_table_speedups_bandwidth_and_copy_share(results):
    rows, machine = bench_report.load_rows(str(results))
    analysis = bench_report.analyse(rows)
    assert analysis["copy_gbps"] == pytest.approx(4.0)
    sf = {(r["shape"], r["impl"]): r for r in analysis["tables"][("sf_conv", "fwd", "cuda", "channels_last")]}
    fast = sf[("32->128@56", "falconnet-triton")]
    assert fast["speedup"] == pytest.approx(2.0)  # dense 4 ms / 2 ms
    assert fast["gbps"] == pytest.approx(4.0) and fast["copy_share"] == pytest.approx(1.0)
    assert sf[("128->32@56", "falconnet-triton")]["speedup"] == pytest.approx(0.5)
    geo = analysis["geomeans"][("sf_conv", "fwd", "cuda", "channels_last")]
    assert geo["falconnet-triton"] == pytest.approx(1.0)  # sqrt(2 * 0.5)
    text = bench_report.render(analysis, machine)
    assert "device: Test GPU" in text and "plain copy (roofline, same run): 4 GB/s" in text
    assert "| 32->128@56 | falconnet-triton | 2000.0 | 1800.0 | 4 | 100 | 2.00x |" in text
    # the pieces table has no baseline: a plain "speedup" column of dashes, no geomean line
    pieces = text[text.index("## repso_node_part"):].split("\n## ")[0]
    assert "speedup vs" not in pieces.splitlines()[2] and "geomean" not in pieces
    assert "| 128@56 | fold | 10.0 | 9.0 | - | - | - |" in pieces


def test_paired_speedup_column_on_cpu_runs(tmp_path):
    """A CPU case that also timed itself alternately with its baseline (extra_info["paired"]) gets a
    paired-speedup column and geomean beside the separate cases' ratio; rows without it show a dash."""
    paired = {"rounds": 10, "median_s": 1e-3, "min_s": 9e-4, "baseline_median_s": 3e-3, "baseline_min_s": 2.8e-3}
    rows = [
        _bench("sf_conv", "dense", "128->32@56", 4e-3, device="cpu"),
        _bench("sf_conv", "falconnet-cpp", "128->32@56", 1e-3, device="cpu", paired=paired),
        _bench("sf_conv", "dense", "32->128@56", 2e-3, device="cpu"),
        _bench("sf_conv", "falconnet-cpp", "32->128@56", 1e-3, device="cpu",
               paired={**paired, "baseline_median_s": 1.2e-3}),
    ]
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"benchmarks": rows, "machine_info": {}}))
    loaded, machine = bench_report.load_rows(str(path))
    analysis = bench_report.analyse(loaded)
    key = ("sf_conv", "fwd", "cpu", "channels_last")
    by = {(r["shape"], r["impl"]): r for r in analysis["tables"][key]}
    assert by[("128->32@56", "falconnet-cpp")]["speedup"] == pytest.approx(4.0)  # separate cases
    assert by[("128->32@56", "falconnet-cpp")]["paired_speedup"] == pytest.approx(3.0)  # alternated
    assert by[("128->32@56", "dense")]["paired_speedup"] is None
    assert analysis["paired_geomeans"][key]["falconnet-cpp"] == pytest.approx((3.0 * 1.2) ** 0.5)
    text = bench_report.render(analysis, machine)
    assert "| speedup vs dense | paired speedup |" in text
    assert "| 128->32@56 | falconnet-cpp | 1000.0 | 900.0 | - | - | 4.00x | 3.00x |" in text
    assert "| 128->32@56 | dense | 4000.0 | 3600.0 | - | - | 1.00x | - |" in text
    assert "geomean paired speedup (op and baseline alternated in one case): falconnet-cpp 1.90x" in text


def test_cli_writes_markdown_and_chart(results, tmp_path):
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    out = subprocess.run([sys.executable, "-m", "falconnet.cli", "bench", str(results), "--markdown", str(md),
                          "--png", str(png)], capture_output=True, text=True, check=True)
    assert "geomean speedup: dense 1.00x, falconnet-triton 1.00x" in out.stdout
    assert md.read_text().startswith("device: Test GPU")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    for path, message in ((missing, "does not exist"), (bad, "is not a pytest-benchmark JSON"),
                          (empty, "hold no falconnet benchmark rows")):
        out = subprocess.run([sys.executable, "-m", "falconnet.cli", "bench", str(path)], capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stderr and str(path) in out.stderr


def test_backend_choices_from_a_gpu_run(tmp_path):
    """The defaults a GPU run supports: per op and pass the faster backend (geomean; backward =
    fwd+bwd - fwd), the SF-Conv shapes where the composed GEMM wins (forward and backward apart),
    and RepSO's weight-gradient kernel; nothing for ops the run did not time."""
    rows = []
    for shape, cuda, triton, gemm in (("32->128@56", 3e-3, 2e-3, 1e-3), ("128->32@56", 1e-3, 2e-3, 3e-3)):
        rows += [_bench("sf_conv", "falconnet-cuda", shape, cuda), _bench("sf_conv", "falconnet-triton", shape, triton),
                 _bench("sf_conv", "falconnet-triton-gemm", shape, gemm)]
        # backward (fwd+bwd - fwd): cuda 4 ms, triton 2 ms, gemm 3 ms at the first shape; 1 / 5 / 4 at the second
        b = {"32->128@56": (4e-3, 2e-3, 3e-3), "128->32@56": (1e-3, 5e-3, 4e-3)}[shape]
        rows += [_bench("sf_conv", "falconnet-cuda", shape, cuda + b[0], pass_="fwd+bwd"),
                 _bench("sf_conv", "falconnet-triton", shape, triton + b[1], pass_="fwd+bwd"),
                 _bench("sf_conv", "falconnet-triton-gemm", shape, gemm + b[2], pass_="fwd+bwd")]
    rows += [_bench("repso_node_part", "conv-wgrad", "128@56", 2e-3, pass_="fwd+bwd pieces"),
             _bench("repso_node_part", "conv-wgrad-triton", "128@56", 1e-3, pass_="fwd+bwd pieces")]
    path = tmp_path / "gpu.json"
    # the conv: cuDNN's against the row kernel
    more = rows + [_bench("repso_node_part", "conv", "128@56", 2e-3, pass_="fwd+bwd pieces"),
                   _bench("repso_node_part", "conv-rows", "128@56", 1e-3, pass_="fwd+bwd pieces")]
    path.write_text(json.dumps({"benchmarks": more}))
    assert "repso_train.CONV = 'rows'   # the row kernel 2.00x" in "\n".join(
        bench_report.backend_choices(bench_report.load_rows(str(path))[0]))
    path.write_text(json.dumps({"benchmarks": rows}))
    loaded, _ = bench_report.load_rows(str(path))
    choices = "\n".join(bench_report.backend_choices(loaded))
    # forward: cuda/triton = 1.5 and 0.5 -> geomean 0.87 < 1: CUDA C++; backward: 2 and 0.2 -> 0.63: CUDA C++
    assert "CUDA_DEFAULT[('sf_conv', 'forward')] = 'cuda'" in choices
    assert "CUDA_DEFAULT[('sf_conv', 'backward')] = 'cuda'" in choices
    assert "dw_conv3x3" not in choices
    # the GEMM beats the two-stage kernel (a run before the routing: "falconnet-triton") forward at
    # 32->128 only, backward at 128->32 only: the two-stage kernel's pairs are listed
    composed = next(line for line in choices.splitlines() if "COMPOSED" in line)
    assert "faster at 2 of 4" in composed
    assert "(128, 32, 'forward')" in composed and "(32, 128, 'backward')" in composed
    assert "(32, 128, 'forward')" not in composed and "(128, 32, 'backward')" not in composed
    assert "repso_train.WEIGHT_GRAD = 'triton'" in choices  # 2x cuDNN (no rows kernel timed)
    # with the row kernel timed too, the fastest of the three wins
    for rows_time, best in ((0.5e-3, "rows"), (4e-3, "triton")):
        more = rows + [_bench("repso_node_part", "conv-wgrad-rows", "128@56", rows_time, pass_="fwd+bwd pieces")]
        path.write_text(json.dumps({"benchmarks": more}))
        line = next(line for line in bench_report.backend_choices(bench_report.load_rows(str(path))[0])
                    if "WEIGHT_GRAD" in line)
        assert line.startswith(f"repso_train.WEIGHT_GRAD = {best!r}") and "rows " in line, line
    path.write_text(json.dumps({"benchmarks": rows}))
    # a later run names the two-stage kernel apart: it, not the routed op, is the comparison
    later = rows + [_bench("sf_conv", "falconnet-triton-two-stage", "128->32@56", 1e-3)]
    path.write_text(json.dumps({"benchmarks": later}))
    composed = next(line for line in bench_report.backend_choices(bench_report.load_rows(str(path))[0])
                    if "COMPOSED" in line)
    assert "(128, 32, 'forward')  # 0.33x" in composed
    # and the command prints them after the tables
    out = subprocess.run([sys.executable, "-m", "falconnet.cli", "bench", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "## backend choices this run supports" in out and "COMPOSED" in out


def test_refco_statistics_route_from_a_gpu_run(tmp_path):
    """RefCO's two statistics routes timed side by side on a GPU: the report gives the full
    covariance's speed against the per-group route and names the shapes where it is slower."""
    rows = []
    for shape, gram, groups in (("32->128@56", 1e-3, 4e-3), ("1024->256@7", 2e-3, 1e-3)):
        rows += [_bench("refco_train", "refco-fused", shape, gram, pass_="fwd+bwd"),
                 _bench("refco_train", "refco-fused-groups", shape, groups, pass_="fwd+bwd")]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"benchmarks": rows}))
    line = next(line for line in bench_report.backend_choices(bench_report.load_rows(str(path))[0]) if "STATS" in line)
    assert "the full covariance 1.41x" in line and "slower at: 1024->256@7 0.50x" in line, line  # sqrt(4 * 0.5)


def test_no_backend_choices_without_both_backends(results):
    rows, _ = bench_report.load_rows(str(results))
    assert bench_report.backend_choices(rows) == []
