"""Export a deployed model to ONNX and TorchScript, in plain PyTorch operators.

A deployed FalconNet calls the custom ops torch.ops.falconnet.sf_conv and dw_conv3x3, which
neither ONNX nor a TorchScript file loaded without this package knows. Both become standard
operators in the exported files:

* sf_conv -> a 1x1 convolution with the SF-Conv pair's dense (C_out, C_in) weight
  (falconnet_kernels.sf_conv_dense_weight, the one definition of that product), then the bias,
  activation and residual in the op's epilogue order;
* dw_conv3x3 -> a depthwise nn.functional.conv2d with padding 1.

ONNX: the model is captured with torch.export and the two ops are decomposed in that graph.
TorchScript: the model is traced while a TorchFunctionMode (PlainOps) reroutes the two ops to the
same decompositions. Either way every layer that calls the ops is covered, whatever its class;
the dense weights become constants (ONNX's optimizer folds them; torch.jit.freeze does too).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .checkpoint import atomic_write


def _sf_conv_plain(x, w1, w2, bias, residual, activation):
    from falconnet_kernels.reference import apply_activation, sf_conv_dense_weight

    weight = sf_conv_dense_weight(w1, w2)
    y = apply_activation(F.conv2d(x, weight[:, :, None, None], bias), activation)
    return y if residual is None else y + residual


def _dw_conv3x3_plain(x, weight, bias, stride, activation):
    from falconnet_kernels.reference import apply_activation

    return apply_activation(F.conv2d(x, weight, bias, stride=stride, padding=1, groups=x.shape[1]), activation)


def plain_decompositions() -> dict:
    import falconnet_kernels  # noqa: F401  (registers torch.ops.falconnet)

    return {
        torch.ops.falconnet.sf_conv.default: _sf_conv_plain,
        torch.ops.falconnet.dw_conv3x3.default: _dw_conv3x3_plain,
    }


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export of ``model`` (eval mode) with the custom ops replaced by standard ones."""
    model = model.eval()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    program = program.run_decompositions(plain_decompositions())
    leftover = {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "falconnet" in str(n.target)}
    if leftover:
        raise RuntimeError(f"export: custom ops left after decomposition: {sorted(leftover)}")
    return program


class PlainOps(TorchFunctionMode):
    """While active, calls of the fused ops run their standard-operator decompositions instead.

    The TorchScript tracer then records aten ops only, and traces the model's own code (so a
    flatten stays batch-size generic, which a trace of an exported graph would not).
    """

    def __init__(self):
        super().__init__()
        self.table = {op.overloadpacket: fn for op, fn in plain_decompositions().items()}
        self.table.update(plain_decompositions())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = self.table.get(func)
        if replacement is not None:
            return replacement(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int = 18) -> None:
    program = export_program(model, example, dynamic_batch=True)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # the exporter writes its own file: let it write a temporary one, then publish it atomically
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(program, (example,), tmp_path, dynamo=True, opset_version=opset,
                              input_names=["images"], output_names=["logits"], external_data=False, verbose=False)
        with open(tmp_path, "rb") as f:
            data = f.read()
    import onnx

    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write(path, lambda f: f.write(data))


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """A traced TorchScript file in standard operators, loadable with torch.jit.load alone."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notices
        # input checks in the model code read tensor values; the check at another batch size
        # (export_all) is what shows the trace generalises
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with PlainOps():
            traced = torch.jit.trace(model.eval(), (example,), check_trace=False)
        leftover = {n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith("falconnet")}
        if leftover:
            raise RuntimeError(f"TorchScript export: custom ops left in the trace: {sorted(leftover)}")
        traced = torch.jit.freeze(traced.eval())
        atomic_write(path, lambda f: torch.jit.save(traced, f))


def check_onnx(path: str, model: nn.Module, example: torch.Tensor) -> float:
    """Max abs difference between onnxruntime on ``path`` and ``model`` on the same random input."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: example.cpu().numpy().astype(np.float32)})[0]
    with torch.no_grad():
        want = model.eval()(example).float().cpu().numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"onnxruntime output shape {got.shape} != PyTorch's {want.shape}")
    return float(np.abs(got - want).max())


def check_torchscript(path: str, model: nn.Module, example: torch.Tensor) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return float((loaded(example) - model.eval()(example)).abs().max())


def export_all(model: nn.Module, img_size: int, out_prefix: str, formats=("onnx", "torchscript"), batch: int = 2,
               opset: int = 18, seed: int = 0) -> dict:
    """Export to ``<out_prefix>.onnx`` / ``.ts`` and check each against the PyTorch model (float32, CPU).

    Returns {format: {"path", "max_abs_diff"}}. The tolerance is the caller's: float32 with a
    different summation order differs by ~1e-6 relative to the logits' size.
    """
    model = model.cpu().float().eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(batch, 3, img_size, img_size, generator=gen)
    check_input = torch.randn(batch + 1, 3, img_size, img_size, generator=gen)  # another batch size than traced
    results = {}
    if "onnx" in formats:
        path = out_prefix + ".onnx"
        export_onnx(model, example, path, opset)
        results["onnx"] = {"path": path, "max_abs_diff": check_onnx(path, model, check_input)}
    if "torchscript" in formats:
        path = out_prefix + ".ts"
        export_torchscript(model, example, path)
        results["torchscript"] = {"path": path, "max_abs_diff": check_torchscript(path, model, check_input)}
    return results
