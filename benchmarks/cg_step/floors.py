"""The floor of a full CG-Newton iteration: what it must do beyond an SGD iteration.

On the seed problem (``nn.Linear(784, 10)``, cross-entropy, HBP GGN with averaged
Jacobians) a CG-Newton iteration must do, besides SGD's forward, backward and update:

- the output Hessian ``H = (1/N) sum_n (diag p_n - p_n p_n^T) = (1/N) (diag(sum_n p_n) -
  P^T P)``: a softmax of the logits, a column sum, a ``diag``, one ``C x N x C`` product,
  a difference and a scale (6 operators, 10 launches as counted: the transposed softmax
  copies; ``output_hessian_floor``);
- the HBP blocks of the Linear layer: the weight's is ``H (x) xbar xbar^T`` with ``xbar``
  the mean input (one reduction of the ``N x 784`` batch; ``hbp_block_floor``), the bias's
  is ``H`` itself (nothing);
- the CG iterations' products: ``iterations x`` one damped block product (``product``),
  each with its two reductions and three updates (launch counts only: their time is below
  the product's);

so its time floor is ``sgd_iteration + output_hessian_floor + hbp_block_floor +
iterations x product`` (the update of the parameters counted as SGD's), over
``sgd_iteration``. The product is the eager one (10 launches); a compiled loop can fuse
below it, so the floor is an upper estimate of what no implementation can avoid.
"""

from __future__ import annotations

from typing import Dict, List

__all__ = ["iteration_floor", "iteration_floor_lines", "OUTPUT_HESSIAN_LAUNCHES"]

#: softmax, column sum, diag, P^T P, difference, scale
OUTPUT_HESSIAN_LAUNCHES = 6
#: the mean input of the Linear layer
HBP_BLOCK_LAUNCHES = 1
#: per CG iteration besides the product: p^T A p, r^T r; x, r, p updates
CG_EXTRA_LAUNCHES = 5


def iteration_floor(results: Dict) -> Dict:
    """Time and launch floors of the full iteration over SGD's (see the module docstring)."""
    timings, launches = results["timings"], results.get("launches", {})
    names = ("sgd_iteration", "output_hessian_floor", "hbp_block_floor", "product")
    if any("median_s" not in timings.get(n, {}) for n in names):
        return {"status": "n/a"}
    iterations = max(results["cg_iterations"].values())
    out = {"iterations": iterations}
    for clock, key in (("wall", "median_s"), ("cpu", "cpu_median_s")):
        sgd = timings["sgd_iteration"][key]
        extra = (
            timings["output_hessian_floor"][key]
            + timings["hbp_block_floor"][key]
            + iterations * timings["product"][key]
        )
        out[f"{clock}_extra_ms"] = extra * 1e3
        out[clock] = (sgd + extra) / sgd
    counted = {n: launches.get(n, {}).get("aten_top_level") for n in names}
    product, sgd = counted["product"], counted["sgd_iteration"]
    if product is not None and sgd is not None:
        # the floor candidates' own counts where measured (a transposed softmax copies)
        hessian = counted["output_hessian_floor"] or OUTPUT_HESSIAN_LAUNCHES
        block = counted["hbp_block_floor"] or HBP_BLOCK_LAUNCHES
        extra = hessian + block + iterations * (product + CG_EXTRA_LAUNCHES)
        out.update(
            sgd_launches=sgd,
            hessian_launches=hessian,
            extra_launches=extra,
            launch_ratio=(sgd + extra) / sgd,
        )
    return out


def iteration_floor_lines(results: Dict) -> List[str]:
    """The floor of the full iteration, next to the measured ratios and the 2.5x goal."""
    floor = results.get("iteration_floor", {})
    if "wall" not in floor:
        return []
    goals = {g["name"]: g for g in results["goals"] if "cpu" in g}
    measured = goals.get("full iteration / SGD iteration (compiled solver)", {})
    lines = [
        "",
        "Floor of the full iteration (benchmarks/cg_step/floors.py): SGD's iteration + the "
        f"output Hessian ({floor.get('hessian_launches', OUTPUT_HESSIAN_LAUNCHES)} launches, "
        "`output_hessian_floor`) + the "
        f"Linear layer's HBP block (the mean input, `hbp_block_floor`) + "
        f"{floor['iterations']} CG iterations x one damped `product` = "
        f"{floor['wall']:.2f}x SGD's iteration by wall time, {floor['cpu']:.2f}x by CPU time "
        f"(+{floor['cpu_extra_ms']:.2f} ms CPU over SGD's).",
    ]
    if "launch_ratio" in floor:
        lines[-1] += (
            f" By launches: SGD's iteration {floor['sgd_launches']} + "
            f"{floor['extra_launches']} = {floor['launch_ratio']:.2f}x."
        )
    if "cpu" in measured:
        above = "above" if 2.5 > floor["cpu"] else "below"
        lines[-1] += (
            f" The 2.5x goal is {above} this floor; the compiled iteration measures "
            f"{measured['cpu']:.2f}x CPU ({measured['wall']:.2f}x wall), "
            f"{measured['cpu'] - floor['cpu']:.2f}x of SGD's iteration above the floor."
        )
    return lines
