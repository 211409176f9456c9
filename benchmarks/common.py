"""Shapes, timing and roofline helpers shared by the pytest-benchmark files.

Timing on CUDA: every timed call replays a CUDA graph that holds one call of the op (so the
Python dispatch of the custom op is not what is measured), and the timer synchronizes the
device before it reads the clock (cuda_sync_timer), so each round covers finished work only.
"""
from __future__ import annotations

import statistics
import time

import torch

# SPEC section 6: the point-wise shapes of LightNet's Meta Light Blocks, expansion 4, both
# directions, at the stage resolutions of a 224x224 input: (C_in, C_out, H=W).
PW_SHAPES = [
    (32, 128, 56), (128, 32, 56),
    (64, 256, 28), (256, 64, 28),
    (128, 512, 14), (512, 128, 14),
    (256, 1024, 7), (1024, 256, 7),
]
# The hidden (expanded) widths where RepSO's folded depthwise conv runs: (C, H=W).
DW_SHAPES = [(128, 56), (256, 28), (512, 14), (1024, 7)]

BATCH = {"cuda": 128, "cpu": 16}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def cuda_sync_timer() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def forced_backend(name: str | None):
    """FALCONNET_BACKEND set to name for the duration (falconnet_kernels._backend.forcing)."""
    from falconnet_kernels import _backend

    return _backend.forcing(name)


def graphed(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn() (warmed up on a side stream first): time its replay(), reset() it after."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def paired_times(fn, baseline, rounds: int) -> dict:
    """fn and baseline called alternately, their order flipped every round: the medians and minima
    of both. pytest-benchmark times each case on its own, minutes apart from its baseline's case; on
    a machine whose speed drifts within minutes (the 2-core AVX2 dev machine: dense oneDNN's time for
    one shape 3.5 ms in one minute and 6.6 ms in another, 2026-11-27) a ratio of two such cases
    drifts with it, while calls interleaved in the same seconds see the same machine.

    Each timed call follows an untimed call of the same function, so that it starts from its own
    cache state (as in pytest-benchmark's back-to-back rounds), not from the other's: alternated
    call by call, the fused SF-Conv at 128->32@56 channels_last (2-core Zen 5, 32 MB L3,
    2026-11-28) inherited dense oneDNN's 6.4 MB of dirty output lines and took 1.37 ms against
    1.04 ms back to back, while dense found the op's input still in the L3."""
    times = ([], [])
    for i in range(rounds):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            f = (fn, baseline)[j]
            f()
            t = time.perf_counter()
            f()
            times[j].append(time.perf_counter() - t)
    return {"rounds": rounds, "median_s": statistics.median(times[0]), "min_s": min(times[0]),
            "baseline_median_s": statistics.median(times[1]), "baseline_min_s": min(times[1])}


def run_benchmark(benchmark, fn, device: str, info: dict, backend: str | None = None, rounds: int | None = None,
                  paired=None):
    """Time fn with pytest-benchmark; fn is captured in a CUDA graph on GPU. On CPU, with paired (the
    baseline's own function), fn and the baseline are then also timed alternately for as many rounds
    (paired_times), into extra_info["paired"]: `falconnet bench` shows that ratio beside the one of
    the separate cases."""
    benchmark.extra_info.update(info)
    with forced_backend(backend):
        if device == "cuda":
            graph = None
            try:
                graph = graphed(fn)
                benchmark.extra_info["cuda_graph"] = True
            except Exception as exc:  # noqa: BLE001 - fall back to plain launches, and say so
                torch.cuda.synchronize()
                benchmark.extra_info["cuda_graph"] = False
                benchmark.extra_info["graph_error"] = str(exc)[:200]
            try:
                benchmark.pedantic(graph.replay if graph else fn, rounds=rounds or 200, warmup_rounds=10, iterations=1)
            finally:
                if graph is not None:
                    # the graph's private memory pool goes back now, not whenever pytest-benchmark
                    # drops its reference to replay (pools of earlier cases filled an H100)
                    torch.cuda.synchronize()
                    graph.reset()
        else:
            benchmark.pedantic(fn, rounds=rounds or 10, warmup_rounds=2, iterations=1)
            if paired is not None:
                paired()  # its warm-up
                benchmark.extra_info["paired"] = paired_times(fn, paired, rounds or 10)


def saved_bytes(forward, x: torch.Tensor) -> int:
    """Distinct storages saved for backward by one forward, plus its output (once, if it is saved
    too), in bytes."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    storages.pop(x.untyped_storage().data_ptr(), None)  # the input exists either way
    storages[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
    return sum(storages.values())


def peak_cuda_bytes(step) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def falconnet_train_step(benchmark, device: str, batch: int, size: int, configure, info: dict, rounds: int) -> None:
    """Time one training step (forward, cross-entropy, backward) of the registry's FalconNet,
    channels_last as `falconnet train` runs it, after configure(model) sets the layers' own
    training-form flags; info names the op and impl (device, dtype, batch and size are added)."""
    from falconnet.models import create_model

    dtype = DTYPE[device]
    torch.manual_seed(0)
    model = create_model("falconnet", num_classes=100).to(device=device, dtype=dtype).train()
    configure(model)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (batch,)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def fn():
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        return torch.autograd.grad(loss, params)

    info = {**info, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "img_size": size}
    if device == "cuda":
        fn()
        info["peak_bytes"] = peak_cuda_bytes(fn)
    # the activations autograd keeps for the backward (both devices): what the training forms change
    info["saved_bytes"] = saved_bytes(lambda: model(x), x)
    run_benchmark(benchmark, fn, device, info, rounds=rounds)


def environment() -> dict:
    import platform

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def fused_impls(op: str, device: str) -> list[str]:
    """The fused backends built for `op` on `device`, as benchmark implementation names."""
    import falconnet_kernels

    info = falconnet_kernels.kernels_info()
    if device == "cpu":
        return ["falconnet-cpp"] if info["cpu_kernels"][op] else []
    names = ["falconnet-cuda"] if info["cuda_kernels"][op] else []
    return names + (["falconnet-triton"] if info["triton"] else [])


def repso_node_parts(C: int, H: int, N: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, dict]:
    """RepSO's GPU one-node path (_OneConvTrainTriton) at K = 3, piece by piece, for one default
    layer (three 3x3, 1x3, 3x1, 1x1, identity) on channels_last x (N, C, H, H): (x, {piece name:
    a function running that piece as the node does}). The moments kernel, the fold kernel, the
    conv (cuDNN's and the row kernel, repso_train.CONV), the weight gradient (cuDNN's and the two
    Triton ones, repso_train.WEIGHT_GRAD), the fold's backward kernel, and the grad_x kernel
    (moments backward + the conv's input gradient). Used by the benchmark's node pieces and by
    scripts/gpu_profile.py."""
    import torch.nn.functional as F

    from falconnet.layers.repso import RepSO
    from falconnet.layers.repso_train import _eps_on, _flat_parameters
    from falconnet_kernels import triton_dw_conv3x3
    from falconnet_kernels import triton_repso_fold as tf
    from falconnet_kernels import triton_repso_moments as tm

    K = 3
    torch.manual_seed(0)
    layer = RepSO(C).to(device=device, dtype=dtype).train()
    x = torch.randn(N, C, H, H, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
    gy = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=dtype))
    bns = [b.bn for b in layer.branches] + [layer.identity_bn]
    weights = [b.conv.weight.detach() for b in layer.branches]
    # the parameters as the node takes them: one flat tensor
    params = tf.Params.flat(_flat_parameters(weights, bns).detach(), tuple((w.shape[2], w.shape[3]) for w in weights),
                            True, K, C)
    eps = _eps_on(tuple(float(bn.eps) for bn in bns), x.device)
    n_pos = N * H * H
    sums, shift = tm.forward_totals3(x)
    mean, cov, weight, bias, _, _ = tf.fold_forward(sums, None, shift, n_pos, params, eps, K, dtype)
    weight = weight.view(C, 1, K, K)
    # as the node runs them at K = 3: the weight gradient as (10, C) float64 totals, and the fold
    # backward writing the grad_x kernel's class tables
    totals = tm.conv3_weight_grad_totals(gy, x)
    grad_w, grad_b = totals[:9].t(), totals[9]
    tables = tf.fold_backward(grad_w, grad_b, mean, cov, params, eps, K, dtype, n_pos=n_pos)[3:]
    return x, {
        "moments": lambda: tm.forward_totals3(x),
        "fold": lambda: tf.fold_forward(sums, None, shift, n_pos, params, eps, K, dtype),
        "conv": lambda: F.conv2d(x, weight, bias, padding=1, groups=C),
        "conv-rows": lambda: tm.conv3_forward(x, weight, bias),  # repso_train.CONV = "rows"
        "conv-wgrad": lambda: torch.ops.aten.convolution_backward(
            gy, x, weight, [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C, [False, True, True]),
        # the alternatives to cuDNN's weight gradient (repso_train.WEIGHT_GRAD = "triton", "rows")
        "conv-wgrad-triton": lambda: triton_dw_conv3x3.dw_conv3x3_weight_grad(gy, x),
        "conv-wgrad-rows": lambda: tm.conv3_weight_grad_totals(gy, x),
        "fold-bwd": lambda: tf.fold_backward(grad_w, grad_b, mean, cov, params, eps, K, dtype, n_pos=n_pos),
        "grad-x": lambda: tm.backward3_launch(x, *tables, conv=(gy, weight)),
    }
