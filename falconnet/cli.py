"""`falconnet <command>`: one entry point, one module per command.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and is listed in
COMMANDS; modules are imported only when their command runs, so `falconnet --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "summary": ("falconnet.summary", "parameters and MACs of every registry model beside the paper's Table 1"),
    "info": ("falconnet.info", "which kernel backends are built and which one runs each op"),
    "bench": ("falconnet.bench_report", "print a benchmark results JSON as a table and write a PNG chart"),
    "train": ("falconnet.train.cli_train", "train a registry model (default: FalconNet on the scikit-learn digits)"),
    "eval": ("falconnet.train.cli_eval", "top-1/top-5 accuracy of a checkpoint on a dataset split"),
    "reparam": ("falconnet.train.cli_reparam", "convert a training checkpoint to a deployed (re-parameterized) one"),
    "export": ("falconnet.train.cli_export", "export a deployed model to ONNX and TorchScript"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falconnet",
        description="FalconNet: LightNet, RepSO, SF-Conv and RefCO in PyTorch, with fused kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=str(exc))
    return parser


def main(argv: list[str] | None = None, tune_malloc: bool | None = None) -> int:
    """Run a command. tune_malloc (default: only for a command-line run, argv None) applies
    falconnet/malloc_tuning.py first; programs that call main([...]) keep their allocator as is."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", None):
        print(f"falconnet {args.command}: not available in this build ({args._missing})", file=sys.stderr)
        return 2
    # keep large freed blocks for reuse instead of page-faulting every activation in again
    # (falconnet/malloc_tuning.py; FALCONNET_MALLOC_TUNING=0 turns it off)
    if argv is None if tune_malloc is None else tune_malloc:
        from falconnet import malloc_tuning

        malloc_tuning.apply()
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
