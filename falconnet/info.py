"""`falconnet info`: which kernel backends are built, which one runs each op, and how the
multi-branch layers train."""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import falconnet_kernels
    from falconnet import malloc_tuning

    info = falconnet_kernels.kernels_info()
    info["malloc_tuning"] = malloc_tuning.state()
    info["training"] = training_paths(info)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"torch {info['torch']}, triton {info['triton'] or 'not installed'}, GPU: {info['gpu'] or 'none'}")
    built = "built" if info["extension_built"] else f"NOT built ({info['extension_error']})"
    print(f"compiled extension: {built}")
    for op, devices in info["active"].items():
        kernels = [name for name, table in (("cpu", info["cpu_kernels"]), ("cuda", info["cuda_kernels"])) if table[op]]
        runs = ", ".join(f"{dev}: {backend}" for dev, backend in devices.items())
        print(f"  {op:<11} compiled for [{', '.join(kernels) or 'none'}]; runs on {runs}")
    if info["forced_backend"]:
        print(f"FALCONNET_BACKEND={info['forced_backend']} forces the backend")
    print("training forms (the layers' defaults):")
    for layer, text in info["training"].items():
        print(f"  {layer:<6} {text}")
    print(f"malloc tuning (large freed blocks kept for reuse): {_MALLOC_STATES.get(info['malloc_tuning'], info['malloc_tuning'])}")
    return 0


def training_paths(info: dict) -> dict:
    """How RepSO, RefCO and ConvBN train by default, and on which kernels (docs/repso_training.md,
    docs/refco_training.md, falconnet/layers/conv_bn.py)."""
    import torch

    from falconnet_kernels.repso_moments import cpp_train_path_available

    cpu = "C++ one-node path" if cpp_train_path_available(torch.empty(1, 1, 1, 1)) else "PyTorch ops"
    repso = f"exact one conv (3x3 folded kernels): statistics and fold on the CPU by the {cpu}"
    if info["gpu"] is not None:
        if info["triton"]:
            from falconnet.layers import repso_train

            repso += (f", on the GPU by the Triton one-node path (3x3: row kernels for the statistics; the conv "
                      f"{repso_train.CONV!r}, its weight gradient {repso_train.WEIGHT_GRAD!r})")
        else:
            repso += ", on the GPU by PyTorch ops"
    from falconnet.layers import refco_train

    stats = {"auto": "x's full covariance on the GPU and at the CPU's widening shapes, per-group covariances "
                     "elsewhere", "gram": "x's full covariance", "groups": "per-group covariances"}[refco_train.STATS]
    refco = (f"exact fused form: BatchNorms folded from their statistics ({stats}; STATS={refco_train.STATS!r}), "
             "one SF-Conv call, two where the per-group forms take a narrowing layer's output statistics (sf_conv above)")
    from falconnet_kernels import _backend

    bn = "C++ kernels" if _backend.select("bn_act", torch.device("cpu")) == "cpp" else "torch's native_batch_norm"
    convbn = (f"BatchNorm + activation as one node on the CPU ({bn} for float32/float64 channels_last; "
              "nn.BatchNorm2d then the activation elsewhere)")
    return {"RepSO": repso, "RefCO": refco, "ConvBN": convbn}


_MALLOC_STATES = {
    "mallopt": "on (glibc mmap/trim thresholds raised; FALCONNET_MALLOC_TUNING=0 turns it off)",
    "env": "left to MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ as set",
    "off": "off (FALCONNET_MALLOC_TUNING=0)",
    "unsupported": "not available (not glibc)",
}
