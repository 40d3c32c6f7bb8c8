"""Command line: ``python -m curvgraph inspect MODEL --input 1,3,224,224 [--fallback]``.

``MODEL`` is ``torchvision:NAME`` (``torchvision.models.get_model(NAME)``, random weights) or
``package.module:attribute``, an ``nn.Module`` instance or a callable that returns one (a
class or a builder function, called without arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

import torch
from torch import nn

from curvgraph.inspection import inspect

__all__ = ["load_model", "main"]


def load_model(spec: str) -> nn.Module:
    """The model named by ``spec`` (see the module docstring)."""
    if ":" not in spec:
        raise ValueError(f"model {spec!r}: expected torchvision:NAME or package.module:attribute")
    path, _, attribute = spec.partition(":")
    if path == "torchvision":
        import torchvision

        return torchvision.models.get_model(attribute, weights=None)
    target = importlib.import_module(path)
    for part in attribute.split("."):
        target = getattr(target, part)
    model = target if isinstance(target, nn.Module) else target()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} gave {type(model).__name__}, not an nn.Module")
    return model


def _shape(text: str) -> List[int]:
    try:
        shape = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input {text!r}: expected sizes like 1,3,224,224"
        ) from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input {text!r}: sizes must be positive")
    return shape


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m curvgraph")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_parser = commands.add_parser(
        "inspect", help="coverage and cost report of a model (no curvature is computed)"
    )
    inspect_parser.add_argument("model", help="torchvision:NAME or package.module:attribute")
    inspect_parser.add_argument(
        "--input", type=_shape, required=True, help="example input shape, e.g. 1,3,224,224"
    )
    inspect_parser.add_argument(
        "--fallback", action="store_true", help="ops without a rule use the autograd fallback"
    )
    inspect_parser.add_argument("--train", action="store_true", help="inspect in training mode")
    inspect_parser.add_argument("--max-features", type=int, default=8192, help="HBP size limit")
    inspect_parser.add_argument(
        "--plot",
        help="draw the graph into this PNG file (top-down; chains in one box, repeated blocks "
        "once with x N)",
    )
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        parser.error(f"cannot load {args.model}: {error}")
    model.train(args.train)
    report = inspect(
        model, torch.randn(*args.input), fallback=args.fallback, max_features=args.max_features
    )
    print(report)
    if args.plot:
        report.plot(args.plot)
        print(f"graph drawn into {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
