"""Issue 4's performance goals, evaluated on the measured rows."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from benchmarks.cost.config import GOAL_PROBLEMS
from benchmarks.timing import ratio as ratio_of


def _find(rows: List[Dict[str, Any]], library: str, group: str) -> Optional[Dict[str, Any]]:
    """The first measured row of ``library`` in ``group`` (else the first row, else None)."""
    candidates = [r for r in rows if r["library"] == library and r["group"] == group]
    return next((r for r in candidates if r["status"] == "ok"), None) or next(
        iter(candidates), None
    )


def _why(row: Optional[Dict[str, Any]], m: str) -> str:
    if row is None:
        return "row not in this run"
    return row["not_measured"].get(m) or row["reason"] or "not measured"


def _median(row: Optional[Dict[str, Any]], m: str) -> Optional[float]:
    if row is None or m not in row["timings"]:
        return None
    return row["timings"][m]["median_s"]


def _goal(
    problem: str,
    text: str,
    measured_as: str,
    row: Optional[Dict[str, Any]],
    m: str,
    at_most: float,
    peer: Optional[Dict[str, Any]] = None,
    peer_measurement: Optional[str] = None,
) -> Dict[str, Any]:
    """One goal: ``row``'s ratio ``m`` (or its median over ``peer``'s) against ``at_most``."""
    entry: Dict[str, Any] = {
        "problem": problem,
        "goal": text,
        "measured_as": measured_as,
        "at_most": at_most,
        "value": None,
        "status": "not measured",
        "reason": None,
        "group": row["group"] if row else None,
    }
    if peer_measurement is not None:
        a, b = _median(row, m), _median(peer, peer_measurement)
        if a is None:
            entry["reason"] = f"curvgraph: {_why(row, m)}"
        elif b is None:
            entry["reason"] = f"peer: {_why(peer, peer_measurement)}"
        else:
            entry["value"] = ratio_of(a, b)
    elif row is not None and m in row["ratios"]:
        entry["value"] = row["ratios"][m]
    else:
        entry["reason"] = _why(row, m)
    if entry["value"] is not None and math.isfinite(entry["value"]):
        entry["status"] = "met" if entry["value"] <= at_most else "not met"
    return entry


def evaluate_goals(problems: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue 4's performance goals on :data:`GOAL_PROBLEMS`: met / not met / not measured.

    - ``kfac`` pass alone <= 2 gradients;
    - ``kfac`` (forward + backward + pass) <= 0.5 x BackPACK's KFAC (forward + backward);
    - ``kflr``, ``sqrt`` (same) <= BackPACK's KFLR, SqrtGGNExact;
    - ``exact`` all-block product (GGN, Hessian) <= 2 gradients;
    - all-block product from prepared Kronecker blocks (``kfac``, ``kflr``) <= 0.1 gradient.
    """
    goals = []
    for name in GOAL_PROBLEMS:
        if name not in problems or "rows" not in problems[name]:
            continue
        rows = problems[name]["rows"]
        kfac, kflr = _find(rows, "curvgraph", "kfac"), _find(rows, "curvgraph", "kflr")
        goals.append(
            _goal(name, "kfac pass <= 2x gradient", "kfac pass / gradient", kfac, "pass", 2.0)
        )
        for group, peer in (("kfac", "KFAC"), ("kflr", "KFLR"), ("sqrt", "SqrtGGNExact")):
            at_most = 0.5 if group == "kfac" else 1.0
            text = f"{group} <= {'0.5x ' if group == 'kfac' else ''}BackPACK {peer}"
            goals.append(
                _goal(
                    name,
                    text,
                    f"curvgraph (fwd+bwd+{group}) / BackPACK (fwd+bwd with {peer})",
                    _find(rows, "curvgraph", group),
                    "total",
                    at_most,
                    _find(rows, "backpack", group),
                    "total",
                )
            )
        for entry in goals:
            row = _find(rows, "curvgraph", entry["group"] or "")
            if (
                entry["problem"] == name
                and row
                and row.get("batch_size")
                not in (
                    None,
                    problems[name].get("batch_size"),
                )
            ):
                entry["measured_as"] += f", at N = {row['batch_size']}"
        for c in ("ggn", "hessian"):
            goals.append(
                _goal(
                    name,
                    f"exact all-block product ({c}) <= 2x gradient",
                    "product / gradient",
                    _find(rows, "curvgraph", f"exact/{c}"),
                    "product",
                    2.0,
                )
            )
        for group, row in (("kfac", kfac), ("kflr", kflr)):
            goals.append(
                _goal(
                    name,
                    f"{group} all-block product from prepared Kronecker blocks <= 0.1x gradient",
                    "product / gradient",
                    row,
                    "product",
                    0.1,
                )
            )
    return goals
