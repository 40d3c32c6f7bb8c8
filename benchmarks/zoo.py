"""torchvision model zoo: which classification models curvgraph traces, and are they exact?

For every model of ``torchvision.models.list_models(module=torchvision.models)``:

- **fx**: ``torch.fx.symbolic_trace`` traces it (in eval mode);
- **hand-written**: ``curvgraph.trace(model)`` succeeds, i.e. every op has a hand-written rule
  (otherwise the ops without one are listed);
- **fallback**: ``curvgraph.trace(model, fallback=True)`` succeeds;
- **exact**: GGN block products of ``method="exact"`` equal ``torch.func`` (float64, eval mode
  with BatchNorm statistics calibrated on the input, see :func:`exact_check`; batch 2, the
  smallest of ``--sizes`` pixels the model accepts, cross-entropy): for a few
  parameter blocks chosen at random with a fixed seed, ``J^T H J v`` with ``J`` the Jacobian
  of the outputs w.r.t. the block (``torch.func.jvp`` / ``vjp``) and ``H`` the loss Hessian
  w.r.t. the outputs (``jvp`` of ``grad``); passed if the largest relative error is below
  1e-8 (1e-6 for models with hardsigmoid, see :data:`TOLERANCE_HARDSIGMOID`). Models above
  ``--max-params`` are not checked (the float64 copy would not fit a small machine).

Run ``python -m benchmarks.zoo`` (all models, smallest first; writes
``benchmarks/results/zoo.json`` and prints a Markdown table); ``--models resnet18,alexnet``
for a subset, ``--no-exact`` for the tracing columns only, ``--reuse old.json`` to keep the
exact checks of an earlier run for models whose tracing columns did not change (each row
names the commit its exact check ran at). Each row records ``seconds`` and
``peak_memory_gb`` (GiB, the process's peak so far: run one model per process to measure it).
``--family transformers`` runs the Hugging Face zoo instead (:mod:`benchmarks.zoo_transformers`,
its own options; default ``--family torchvision``).

The models are built, sized and calibrated in :mod:`benchmarks.zoo_models`, the exact check is
:mod:`benchmarks.zoo_check`; this module makes the rows and the table (:func:`zoo_row`,
:func:`markdown`) and holds the command line (:func:`main`). :func:`build`,
:func:`calibrate_batch_norm`, :func:`input_size`, :func:`exact_check` and :func:`tolerance`
are importable from here as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import curvgraph
from benchmarks.zoo_check import TOLERANCE, exact_check, tolerance
from benchmarks.zoo_check import TOLERANCE_HARDSIGMOID as TOLERANCE_HARDSIGMOID
from benchmarks.zoo_models import SIZES, build, calibrate_batch_norm, input_size, models_by_size

__all__ = ["build", "calibrate_batch_norm", "input_size", "exact_check", "tolerance"]
__all__ += ["zoo_row", "coverage_summary", "markdown", "main"]

EXACT_KEYS = ("input", "exact", "exact_errors", "exact_error", "exact_skipped", "exact_commit")


def _trace_status(model: nn.Module, fallback: bool) -> Dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            curvgraph.trace(model, fallback=fallback)
        return {"ok": True}
    except curvgraph.UnsupportedOpError as error:
        # ops the fallback can serve (no rule, or a rule refusing the call) vs other problems
        fixable = ("no rule", "unsupported", "arguments do not match")
        missing = {op for _, op, _, why in error.nodes if why.startswith(fixable)}
        problems = {
            why.split(" (")[0] for _, _, _, why in error.nodes if not why.startswith(fixable)
        }
        return {"ok": False, "missing": sorted(missing), "problems": sorted(problems)}
    except Exception as error:  # noqa: BLE001 - recorded in the table
        return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:200]}"}


def zoo_row(
    name: str,
    exact: bool = True,
    max_params: float = 150e6,
    blocks: int = 3,
    sizes: Sequence[int] = SIZES,
) -> Dict:
    """One model's row of the table (see the module docstring)."""
    start = time.perf_counter()
    try:
        model = build(name, "meta")  # structure only: no memory, no initialisation
    except Exception:  # noqa: BLE001 - some builders compute on tensors (regnet)
        model = build(name)
    row: Dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    try:
        torch.fx.symbolic_trace(model)
        row["fx"] = True
    except Exception as error:  # noqa: BLE001
        row.update(fx=False, fx_error=f"{type(error).__name__}: {str(error)[:200]}")
    hand = _trace_status(model, fallback=False)
    row["hand_written"] = hand["ok"]
    row["missing"] = hand.get("missing", [])
    fallback = hand if hand["ok"] else _trace_status(model, fallback=True)
    row["fallback"] = fallback["ok"]
    if "error" in fallback:
        row["error"] = fallback["error"]
    if fallback.get("problems"):
        n = len(fallback["problems"])
        row["error"] = f"{n} kind(s) of node without a usable rule: " + "; ".join(
            fallback["problems"]
        )
    if exact and row["fallback"] and row["params"] <= max_params:
        del model  # the structure (a real model where "meta" fails, in reference cycles
        gc.collect()  # after tracing): not a second copy in memory during the check
        try:
            model = build(name)
            row["input"] = input_size(model, sizes)
            errors = exact_check(model.double(), row["input"], blocks, fallback=not hand["ok"])
            row["exact_errors"] = errors
            row["tolerance"] = tolerance(model)
            row["exact"] = max(errors.values()) < row["tolerance"]
        except Exception as error:  # noqa: BLE001 - recorded in the table
            row.update(exact=False, exact_error=f"{type(error).__name__}: {str(error)[:300]}")
    elif exact and row["fallback"]:
        row["exact_skipped"] = f"{row['params'] / 1e6:.0f}M parameters > --max-params"
    row["seconds"] = time.perf_counter() - start
    row["peak_memory_gb"] = _peak_memory_gb()
    return row


def _peak_memory_gb() -> Optional[float]:
    """Peak resident memory (GiB) of this process so far (all models it ran); ``None`` off Unix."""
    try:
        import resource
    except ImportError:
        return None
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return round(kilobytes / (2**30 if sys.platform == "darwin" else 2**20), 2)


def _mark(value: Optional[bool]) -> str:
    return {True: "yes", False: "no", None: "-"}[value]


def coverage_summary(rows: Sequence[Dict]) -> List[str]:
    """The summary lines of a zoo table: rules only, fallback, not traced, exact checks."""

    def names(rows):
        return ", ".join(r["model"] for r in rows) or "none"

    hand = [r for r in rows if r["hand_written"]]
    fallback = [r for r in rows if r["fallback"] and not r["hand_written"]]
    untraced = [r for r in rows if not r["fallback"]]
    checked = [r for r in rows if "exact" in r]
    return [
        f"- hand-written rules only ({len(hand)} of {len(rows)}): {names(hand)}",
        f"- with the autograd fallback ({len(fallback)}): {names(fallback)}",
        f"- not traced ({len(untraced)}): {names(untraced)}",
        f"- exact check run on {len(checked)}, passed on {sum(1 for r in checked if r['exact'])}",
    ]


def markdown(rows: Sequence[Dict], commit: str = "") -> str:
    """The table of :func:`zoo_row` results."""
    lines = [
        f"torchvision {_torchvision_version()}, torch {torch.__version__}"
        + (f", curvgraph commit {commit}" if commit else ""),
        "",
        *coverage_summary(rows),
        "",
        "| model | params | fx traces | hand-written rules only | with fallback | exact check "
        "(max rel. error, input) | ops without a hand-written rule; other problems |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "exact_errors" in r:
            check = f"{_mark(r['exact'])} ({max(r['exact_errors'].values()):.0e}, {r['input']}px"
            old = r.get("exact_commit") and r["exact_commit"] != r.get("commit")
            check += f", at {r['exact_commit']})" if old else ")"
        elif "exact_error" in r:
            check = f"failed: {r['exact_error'][:80]}"
        elif "exact_skipped" in r:
            check = f"not run ({r['exact_skipped']})"
        else:
            check = "-"
        missing = ", ".join(f"`{m}`" for m in r.get("missing", []))
        if r.get("error"):  # why the fallback does not help either
            missing += ("; " if missing else "") + r["error"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {_mark(r.get('fx'))} | "
            f"{_mark(r['hand_written'])} | {_mark(r['fallback'])} | {check} | {missing} |"
        )
    return "\n".join(lines)


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    """Command line: see the module docstring.

    ``--family transformers`` runs :func:`benchmarks.zoo_transformers.main` on the other
    arguments instead.
    """
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument(
        "--family",
        choices=("torchvision", "transformers"),
        default="torchvision",
        help="which zoo (default torchvision; transformers: benchmarks/zoo_transformers.py)",
    )
    known, rest = family.parse_known_args(argv)
    if known.family == "transformers":
        from benchmarks.zoo_transformers import main as transformers_main

        return transformers_main(rest, commit=_commit())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[family])
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--no-exact", action="store_true", help="tracing columns only")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--commit", default="", help="label (default: git rev-parse HEAD)")
    parser.add_argument("--reuse", type=Path, help="results of an earlier run (see above)")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="input sizes to try, smallest first"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo.json"))
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else None
    commit = args.commit or _commit()
    previous = {}
    if args.reuse:
        previous = {r["model"]: r for r in json.loads(args.reuse.read_text())["rows"]}
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for name in models_by_size(names):
        row = zoo_row(name, exact=False)
        old = previous.get(name, {})
        same = all(old.get(k) == row[k] for k in ("fx", "hand_written", "fallback", "missing"))
        if same and any(k in old for k in EXACT_KEYS[1:]):
            row.update({k: old[k] for k in EXACT_KEYS if k in old})
            row.setdefault("exact_commit", old.get("commit", ""))
            if "exact_errors" in row:  # judged by this version's tolerance
                try:
                    row["tolerance"] = tolerance(build(name, "meta"))
                except Exception:  # noqa: BLE001 - builders that compute on tensors
                    row["tolerance"] = TOLERANCE
                row["exact"] = max(row["exact_errors"].values()) < row["tolerance"]
        elif not args.no_exact:
            row = zoo_row(name, True, args.max_params, args.blocks, sizes)
            row["exact_commit"] = commit
        row["commit"] = commit
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commit": commit, "rows": rows}, indent=1))
    rows.sort(key=lambda r: r["model"])
    args.out.write_text(json.dumps({"commit": commit, "rows": rows}, indent=1))
    print(markdown(rows, commit))
    return rows


if __name__ == "__main__":
    main()
