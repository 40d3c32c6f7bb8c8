"""Snapshots of the recorded calls an exact product reads (``method="exact"``).

A curvature is a snapshot of the point where it was computed: recorded arguments that share
storage with the model's parameters or buffers (detached views of them) are copied once per
storage (:func:`snapshot_contexts`); every other recorded tensor is kept as it is, with its
version counter noted (:func:`recorded_versions`) so that products refuse to run after one
was modified in place.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List

import torch
from torch import Tensor

from curvgraph.rules import Context

__all__ = ["recorded_versions", "snapshot_contexts"]


def _storage_key(tensor: Tensor):
    """What identifies a tensor's memory (``None``: not a plain strided tensor)."""
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return None
    try:
        return tensor.device, tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None


def snapshot_contexts(contexts: Dict[str, Context], owned: Iterable[Tensor]) -> Dict[str, Context]:
    """Contexts whose tensors sharing storage with ``owned`` (parameters) read copies.

    Each shared storage is copied once and the recorded views are rebuilt on the copy with
    their offsets and strides, so tied and viewed parameters stay consistent.
    """
    shared = {_storage_key(t) for t in owned} - {None}
    copies: Dict = {}

    def snap(value):
        if isinstance(value, Tensor):
            key = _storage_key(value)
            if key is None or key not in shared:
                return value
            if key not in copies:
                copies[key] = value.untyped_storage().clone()
            return value.new_empty(0).set_(
                copies[key], value.storage_offset(), value.size(), value.stride()
            )
        if type(value) in (list, tuple):
            return type(value)(snap(v) for v in value)
        return value

    result = {}
    for name, ctx in contexts.items():
        args = {k: snap(v) for k, v in ctx.args.items()}
        output = snap(ctx.output)
        changed = output is not ctx.output or any(_differs(args[k], ctx.args[k]) for k in args)
        # a fresh cache: the old one may hold quantities derived from the live parameters
        result[name] = (
            dataclasses.replace(ctx, args=args, output=output, cache={}) if changed else ctx
        )
    return result


def _differs(new, old) -> bool:
    if type(new) in (list, tuple):
        return any(a is not b for a, b in zip(new, old))
    return new is not old


def recorded_versions(infos, contexts: Dict[str, Context], grads: Dict[str, Tensor]) -> List[tuple]:
    """``(info, what, tensor, version)`` for every recorded tensor the products read."""
    versions = []
    for info in infos.values():
        ctx = contexts[info.node.name]
        for key, value in ctx.args.items():
            values = value if type(value) in (list, tuple) else (value,)
            for v in values:
                if isinstance(v, Tensor):
                    versions.append((info, f"argument {key!r}", v, v._version))
        versions.append((info, "output", ctx.output, ctx.output._version))
        grad = grads.get(info.node.name)
        if isinstance(grad, Tensor):
            versions.append((info, "output gradient", grad, grad._version))
    return versions
