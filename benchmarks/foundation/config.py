"""What the foundation benchmark measures: its problems, settings and definitions.

- :data:`PROBLEMS`: the seed model ``nn.Linear(784, 10)`` (``linear``) and the sigmoid MLP
  784-1000-500-100-10 (``mlp``);
- the settings: :data:`CURVATURES` of the HBP passes, :data:`STEP_CURVATURE`,
  :data:`CG_NEWTON` (the seed's CG-Newton hyperparameters), :data:`SGD`, :data:`SEED`,
  :data:`GOAL`;
- :data:`MEASUREMENTS` and :data:`RATIOS`: every timed measurement and every ratio, with
  what it means (stored with the results).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

from torch import nn

SCHEMA_VERSION = 1
SEED = 0
CURVATURES = ("ggn", "pch-abs", "hessian")
STEP_CURVATURE = "ggn"  # the seed's modify_2nd_order_terms="zero"
CG_NEWTON = dict(lr=0.1, alpha=0.02, cg_atol=0.0, cg_tol=0.1, cg_maxiter=50)
SGD = dict(lr=0.1)  # plain SGD, no momentum
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results"
GOAL = ("hbp_ggn/grad_plain", 1.5)  # the foundation issue: HBP pass <= 1.5 gradients (seed)


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: a model built from a fixed seed and a batch size."""

    name: str
    title: str
    batch_size: int
    build: Callable[[], nn.Module]


def _seed_linear() -> nn.Module:
    return nn.Linear(784, 10)


def _sigmoid_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1000),
        nn.Sigmoid(),
        nn.Linear(1000, 500),
        nn.Sigmoid(),
        nn.Linear(500, 100),
        nn.Sigmoid(),
        nn.Linear(100, 10),
    )


PROBLEMS: Dict[str, Problem] = {
    "linear": Problem("linear", "seed model nn.Linear(784, 10)", 500, _seed_linear),
    "mlp": Problem("mlp", "MLP 784-1000-500-100-10, sigmoid", 128, _sigmoid_mlp),
}


def _measurement_definitions() -> Dict[str, str]:
    definitions = {
        "grad_plain": "gradient: zero_grad + model(x) + cross-entropy + backward",
        "grad_traced": "gradient through the traced graph: zero_grad + cg(x) + cross-entropy "
        "+ backward",
    }
    for c in CURVATURES:
        definitions[f"hbp_{c}"] = (
            f"HBP pass alone: loss_hessian + backward_hessian(curvature={c!r}), after an "
            "untimed traced forward + backward"
        )
        definitions[f"fwd_bwd_hbp_{c}"] = (
            f"traced forward + backward + loss_hessian + backward_hessian(curvature={c!r})"
        )
    definitions["step_cgnewton"] = (
        f"CGNewton.step(curv) alone ({STEP_CURVATURE} blocks), after untimed parameter "
        "restore + forward + backward + HBP pass"
    )
    definitions["step_sgd"] = (
        "torch.optim.SGD.step() alone on the same gradients, after untimed parameter restore "
        "+ forward + backward"
    )
    definitions["iter_cgnewton"] = (
        f"full CG-Newton iteration: zero_grad + cg(x) + loss + backward + loss_hessian + "
        f"backward_hessian({STEP_CURVATURE!r}) + CGNewton.step, after an untimed parameter "
        "restore"
    )
    definitions["iter_sgd"] = (
        "full SGD iteration: zero_grad + model(x) + loss + backward + SGD.step, after an "
        "untimed parameter restore"
    )
    return definitions


MEASUREMENTS = _measurement_definitions()


def _ratio_definitions() -> Dict[str, str]:
    definitions = {"grad_traced/grad_plain": "tracing overhead: traced gradient / plain gradient"}
    for c in CURVATURES:
        definitions[f"hbp_{c}/grad_plain"] = f"HBP pass ({c}) / gradient of the plain model"
        definitions[f"hbp_{c}/grad_traced"] = f"HBP pass ({c}) / gradient through cg(x)"
        definitions[f"fwd_bwd_hbp_{c}/grad_plain"] = (
            f"forward + backward + HBP pass ({c}) / gradient of the plain model"
        )
    definitions["step_cgnewton/step_sgd"] = "CGNewton step / SGD step (same gradients)"
    definitions["iter_cgnewton/iter_sgd"] = (
        "full CG-Newton iteration (fwd + bwd + GGN HBP + step) / full SGD iteration "
        "(fwd + bwd + step)"
    )
    return definitions


RATIOS = _ratio_definitions()
