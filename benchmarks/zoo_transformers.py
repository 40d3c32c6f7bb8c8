"""Transformer zoo: which Hugging Face architectures curvgraph captures, and are they exact?

``python -m benchmarks.zoo --family transformers`` (the torchvision zoo's format, see
:mod:`benchmarks.zoo`). Every architecture of :data:`ARCHITECTURES` is built from a small
random-init config (2 layers, width 32, vocabulary 100, no weights downloaded) in float64
and eval mode, with the nanoGPT model of :mod:`benchmarks.problem_models` beside them, and
run on a batch of 2 sequences of T = 8 tokens (ViT: 2 images of 16 x 16 pixels, patches of
4). Text inputs have an attention mask with the second sequence padded (its last
:data:`PADS` tokens); the causal language models' labels are -100 at the pads. Columns:

- **route**: the capture route ``curvgraph.trace(..., capture="auto")`` took
  (``cg.route``: ``fx`` or ``export``);
- **hand-written**: the trace without ``fallback`` succeeds (every op has a hand-written
  rule; otherwise the ops without one are listed); **fallback**: with ``fallback=True``;
- **exact**: GGN block products of ``method="exact"`` against ``J^T H J v`` from
  ``torch.func`` alone (``jvp`` / ``vjp`` over ``functional_call`` of the model, under the
  math kernel of scaled dot-product attention; ``H`` the Hessian of the loss w.r.t. the
  outputs), for three random nonzero blocks chosen with a fixed seed; passed if the largest
  relative error (max-norm) is below 1e-8, or below 1e-6 for the models that compute in
  float32 by design (:data:`TOLERANCE_FLOAT32`: Llama-family RMSNorm, T5's LayerNorm cast
  their activations to float32, so a float64 reference agrees to ~1e-7 only). Loss:
  cross-entropy, mean over the counted tokens (``ignore_index=-100``) or over the samples;
- **kfac expand / reduce**: Kronecker blocks of two ``nn.Linear`` layers (the first and
  the last whose weight is not tied) against curvlinops' ``KFACLinearOperator`` with the
  same ``kfac_approx`` (block products with three random vectors, largest relative
  error below the exact check's tolerance). One loss term per sample (logits
  ``[N, C]``): ``method="kflr"`` against ``fisher_type="type-2"``, cross-entropy.
  Per-token outputs ``[N, T, V]``: ``method="kfac"`` with one Monte-Carlo sample of an MSE
  loss on the logits against ``fisher_type="mc"`` drawing the same samples, because
  curvlinops' type-2 factors backpropagate column ``c`` of every token's loss-Hessian root
  together: behind a layer that mixes positions (attention) its ``G`` holds cross-token
  terms that are not in the GGN, for expand as well as reduce (the type-2 expand errors are
  kept in the row as ``kfac_type2_expand``; ``tests/test_kfac_weight_sharing.py`` shows
  the reduce case). curvlinops knows no ``ignore_index``: there every token counts.

:func:`transformer_row` makes one row, :func:`markdown` the table, :func:`main` the command
line (``--models gpt2,llama``, ``--no-exact``, ``--no-kfac``, ``--out``); the results go to
``benchmarks/results/zoo-transformers.{json,md}``. The models and batches are
:mod:`benchmarks.zoo_transformer_models`, the checks :mod:`benchmarks.zoo_transformer_checks`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.zoo import coverage_summary  # the torchvision zoo's summary lines
from benchmarks.zoo_transformer_checks import (
    _short,
    _trace_status,
    exact_check,
    float32_casts,
    kfac_check,
)
from benchmarks.zoo_transformer_models import (
    ARCHITECTURES,
    BATCH,
    PADS,
    REQUIRED,
    TOLERANCE,
    TOLERANCE_FLOAT32,
    Architecture,
    T,
    build,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "TOLERANCE",
    "TOLERANCE_FLOAT32",
    "exact_check",
    "kfac_check",
    "main",
    "markdown",
    "transformer_row",
]

# -- rows and table --------------------------------------------------------------------------


def transformer_row(name: str, exact: bool = True, kfac: bool = True, blocks: int = 3) -> Dict:
    """One architecture's row of the table (see the module docstring)."""
    arch = ARCHITECTURES[name]
    start = time.perf_counter()
    model = build(arch)
    row: Dict[str, Any] = {"model": name, "class": type(model).__name__, "task": arch.task}
    row["params"] = sum(p.numel() for p in model.parameters())
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention:
        row["attention"] = attention
    cg, hand = _trace_status(arch, model, fallback=False)
    row["hand_written"] = hand["ok"]
    row["missing"] = hand.get("missing", [])
    if not hand["ok"]:
        cg, status = _trace_status(arch, model, fallback=True)
    else:
        status = hand
    row["fallback"] = status["ok"]
    if "error" in status:
        row["error"] = status["error"]
    if status.get("problems"):
        row["error"] = "; ".join(status["problems"])
    if cg is not None:
        row["route"] = cg.route
        row["float32_casts"] = float32_casts(cg)
    row["tolerance"] = arch.tolerance
    if arch.float32:
        row["float32"] = arch.float32
    if exact and cg is not None:
        try:
            result = exact_check(arch, model, cg, blocks)
            row["exact_errors"] = result["errors"]
            if result["zero"]:
                row["zero_blocks"] = result["zero"]
            row["exact"] = max(result["errors"].values()) < arch.tolerance
        except Exception as error:  # noqa: BLE001 - recorded in the table
            row.update(exact=False, exact_error=_short(error))
    if kfac and cg is not None:
        row["kfac"] = {}
        for approx in ("expand", "reduce"):
            try:
                result = kfac_check(arch, model, cg, approx)
                result["ok"] = max(result["errors"].values()) < arch.tolerance
            except ImportError as error:
                result = {"ok": None, "error": f"n/a (curvlinops missing: {error})"}
            except LookupError as error:
                result = {"ok": None, "error": f"n/a ({error})"}
            except Exception as error:  # noqa: BLE001 - recorded in the table
                result = {"ok": False, "error": _short(error)}
            row["kfac"][approx] = result
        if arch.per_token and row["kfac"]["expand"].get("errors"):  # for the notes
            result = kfac_check(arch, model, cg, "expand", fisher="type-2")
            row["kfac_type2_expand"] = result["errors"]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _mark(value: Optional[bool]) -> str:
    return {True: "yes", False: "no", None: "-"}[value]


def _exact_cell(r: Dict) -> str:
    if "exact_errors" in r:
        tol = "" if r["tolerance"] == TOLERANCE else f", tol {r['tolerance']:.0e}"
        return f"{_mark(r['exact'])} ({max(r['exact_errors'].values()):.0e}{tol})"
    if "exact_error" in r:
        return f"failed: {r['exact_error'][:250]}"
    return "-"


def _kfac_cell(r: Dict, approx: str) -> str:
    result = r.get("kfac", {}).get(approx)
    if result is None:
        return "-"
    if "errors" in result:
        kinds = sorted(set(result["blocks"].values()))
        kinds = "" if kinds == ["KroneckerBlock"] else f", {'/'.join(kinds)}"
        zero = f", {len(result['zero'])} zero block" if result.get("zero") else ""
        return f"{_mark(result['ok'])} ({max(result['errors'].values()):.0e}{kinds}{zero})"
    return result["error"][:250] if result["ok"] is None else f"failed: {result['error'][:250]}"


def markdown(rows: Sequence[Dict], commit: str = "") -> str:
    """The table of :func:`transformer_row` results, with its notes."""
    import transformers

    kfac = [r for r in rows if "kfac" in r]
    passed = sum(1 for r in kfac if all(v.get("ok") for v in r["kfac"].values()))
    lines = [
        f"transformers {transformers.__version__}, torch {torch.__version__}"
        + (f", curvgraph commit {commit}" if commit else ""),
        "",
        f"- issue 12's list: {', '.join(REQUIRED)}; the others are extras",
        *coverage_summary(rows),
        f"- kfac expand and reduce vs curvlinops run on {len(kfac)}, both passed on {passed}",
        "",
        "| model | params | capture route | hand-written rules only | with fallback | exact check "
        "(max rel. error) | kfac expand vs curvlinops | kfac reduce vs curvlinops | ops "
        "without a hand-written rule; other problems |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        missing = ", ".join(f"`{m}`" for m in r.get("missing", []))
        if r.get("error"):
            missing += ("; " if missing else "") + r["error"][:400]
        lines.append(
            f"| {r['model']} ({r['class']}) | {r['params'] / 1e3:.1f}k | {r.get('route', '-')} | "
            f"{_mark(r['hand_written'])} | {_mark(r['fallback'])} | {_exact_cell(r)} | "
            f"{_kfac_cell(r, 'expand')} | {_kfac_cell(r, 'reduce')} | {missing} |"
        )
    lines += ["", *_notes(rows)]
    return "\n".join(lines)


def _notes(rows: Sequence[Dict]) -> List[str]:
    float32 = [
        f"{r['model']} ({r['float32']}; {r.get('float32_casts', '?')} float32 nodes in the graph)"
        for r in rows
        if r.get("float32")
    ]
    notes = [
        "Notes:",
        "",
        f"- Inputs: batch {BATCH}, T = {T} tokens, float64, eval mode, random init (seed 0, "
        "parameters that are exactly zero set to small random values); the second sequence "
        f"is padded (attention mask 0 on its last {PADS} tokens), the causal LMs' labels are "
        "-100 there (nanoGPT has no mask: the loss ignores the same tokens). ViT: 2 images "
        "16 x 16, patches 4 x 4. Configs: 2 layers, width 32, vocabulary 100 (nanoGPT 128).",
        "- Exact check: three random blocks with a nonzero reference product (seed 0), "
        '`method="exact"` against `torch.func` (`jvp`/`vjp` over `functional_call`, math '
        "SDPA kernel); relative error (max-norm) < 1e-8, or < 1e-6 (documented tolerance) "
        "for models whose forward computes in float32 by design: "
        + ("; ".join(float32) or "none")
        + ".",
        "- kfac: the first and the last `nn.Linear` whose weight is not tied; three random "
        "block products against curvlinops' `KFACLinearOperator`, relative error below the "
        "exact check's tolerance. One loss per sample (`[N, C]` logits): `kflr` vs "
        '`fisher_type="type-2"`, cross-entropy. Per-token logits `[N, T, V]`: `kfac` with one '
        'Monte-Carlo sample of an MSE loss on the logits vs `fisher_type="mc"` on the same '
        "samples, since curvlinops' type-2 factors backpropagate column c of every token's "
        "loss-Hessian root together, which behind attention (a layer mixing positions) puts "
        "cross-token terms into G that the GGN does not have, for expand as well as reduce "
        "(type-2 expand errors below). curvlinops has no `ignore_index`: there every token "
        "counts.",
    ]
    for r in rows:
        result = r.get("kfac", {}).get("expand", {})
        if "blocks" in result:
            layers = ", ".join(f"`{w}`" for w in result["blocks"])
            line = f"- {r['model']}: kfac layers {layers} ({result['mode']})"
            if "kfac_type2_expand" in r:
                errors = ", ".join(f"{e:.0e}" for e in r["kfac_type2_expand"].values())
                line += f"; kflr expand vs curvlinops type-2: relative errors {errors}"
            notes.append(line + ".")
    return notes


def main(argv: Optional[List[str]] = None, commit: str = "") -> List[Dict]:
    """Command line (``python -m benchmarks.zoo --family transformers``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--no-exact", action="store_true", help="no exact check")
    parser.add_argument("--no-kfac", action="store_true", help="no comparison with curvlinops")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--commit", default=commit, help="label (default: git HEAD)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/zoo-transformers.json")
    )
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(ARCHITECTURES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(ARCHITECTURES)}")
    rows = []
    for name in names:
        row = transformer_row(name, not args.no_exact, not args.no_kfac, args.blocks)
        row["commit"] = args.commit
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commit": args.commit, "rows": rows}, indent=1))
    table = markdown(rows, args.commit)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return rows
