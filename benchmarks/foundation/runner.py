"""Running the foundation benchmark: the timed calls of one problem, and every problem.

:func:`run_problem` times every measurement of :data:`~benchmarks.foundation.config.MEASUREMENTS`
on one problem (the calls themselves: :class:`_Calls`) and records the CG-Newton step's
diagnostics; :func:`run` does so for every problem of the command line and adds the
configuration, the environment and the method to the results.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import curvgraph
from benchmarks.foundation.config import (
    CG_NEWTON,
    CURVATURES,
    GOAL,
    MEASUREMENTS,
    PROBLEMS,
    RATIOS,
    SCHEMA_VERSION,
    SEED,
    SGD,
    STEP_CURVATURE,
    Problem,
)
from benchmarks.machine import contention, cpu_snapshot, environment, load_average
from benchmarks.memory import MEMORY_KINDS, memory_method, peak_memory
from benchmarks.timing import measure_interleaved
from benchmarks.timing import ratio as ratio_of
from curvgraph.datasets import load_mnist_subset


def load_batch(batch_size: int, device: torch.device):
    """The first ``batch_size`` digits of the bundled MNIST training split, flattened."""
    images, labels = load_mnist_subset("train").tensors
    if batch_size > len(labels):
        raise ValueError(f"batch size {batch_size} exceeds the {len(labels)} training digits")
    x = images[:batch_size].reshape(batch_size, -1).to(device)
    return x, labels[:batch_size].to(device)


class _Calls:
    """The calls a problem times, on one model, its traced graph and one fixed batch.

    Every setup restores the parameters saved at construction, so every call sees the same
    parameters, gradients and curvature.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.graph = curvgraph.trace(model)
        self.newton = curvgraph.optim.CGNewton(model.parameters(), **CG_NEWTON)
        self.sgd = torch.optim.SGD(model.parameters(), **SGD)
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self) -> None:
        self.model.load_state_dict(self.initial)

    def forward_backward(self, module: nn.Module):
        self.model.zero_grad(set_to_none=True)
        out = module(self.x)
        loss = F.cross_entropy(out, self.y)
        out.retain_grad()  # loss_hessian after backward() reads the ignored targets from dL/dout
        loss.backward()
        return out, loss

    def hbp(self, out_loss, curvature: str):
        out, loss = out_loss
        output_hessian = curvgraph.loss_hessian(loss, out)
        return self.graph.backward_hessian(output_hessian, curvature=curvature)

    def step_setup(self):
        self.restore()
        return self.hbp(self.forward_backward(self.graph), STEP_CURVATURE)

    def sgd_setup(self) -> None:
        self.restore()
        self.forward_backward(self.graph)

    def gradient_setup(self):
        self.restore()
        return self.forward_backward(self.graph)

    def newton_iteration(self):
        curv = self.hbp(self.forward_backward(self.graph), STEP_CURVATURE)
        self.newton.step(curv)
        return curv

    def sgd_iteration(self) -> None:
        self.forward_backward(self.model)
        self.sgd.step()

    def plan(self) -> Dict[str, Tuple[Callable, Callable]]:
        """Key -> (timed callable, untimed setup); the setup's result is passed to the callable."""
        model, graph = self.model, self.graph
        plan: Dict[str, Tuple[Callable, Callable]] = {
            "grad_plain": (lambda _: self.forward_backward(model), self.restore),
            "grad_traced": (lambda _: self.forward_backward(graph), self.restore),
        }
        for c in CURVATURES:
            plan[f"hbp_{c}"] = (lambda s, c=c: self.hbp(s, c), self.gradient_setup)
            plan[f"fwd_bwd_hbp_{c}"] = (
                lambda _, c=c: self.hbp(self.forward_backward(graph), c),
                self.restore,
            )
        plan["step_cgnewton"] = (self.newton.step, self.step_setup)
        plan["step_sgd"] = (lambda _: self.sgd.step(), self.sgd_setup)
        plan["iter_cgnewton"] = (lambda _: self.newton_iteration(), self.restore)
        plan["iter_sgd"] = (lambda _: self.sgd_iteration(), self.restore)
        assert list(plan) == list(MEASUREMENTS)
        return plan

    def diagnostics(self) -> Dict[str, Any]:
        """One CG-Newton step at the (restored) initial parameters: loss, CG iterations, blocks."""
        curv = self.step_setup()
        loss = F.cross_entropy(self.model(self.x), self.y).item()
        self.newton.step(curv)
        cg_iterations = {
            name: self.newton.state[p].get("cg_iterations")
            for name, p in self.model.named_parameters()
        }
        finite = all(torch.isfinite(p).all().item() for p in self.model.parameters())
        blocks = {name: type(block).__name__ for name, block in curv.items()}
        self.restore()
        return {
            "loss": loss,
            "cg_iterations": cg_iterations,
            "blocks": blocks,
            "parameters_finite_after_steps": finite,
        }


def run_problem(
    problem: Problem,
    repeats: int,
    warmup: int,
    device: torch.device,
    batch_size: Optional[int] = None,
    progress: Optional[tqdm] = None,
) -> Dict[str, Any]:
    """Time every measurement of :data:`MEASUREMENTS` on ``problem``; return its results."""
    n = batch_size or problem.batch_size
    x, y = load_batch(n, device)
    torch.manual_seed(SEED)
    model = problem.build().to(device)
    calls = _Calls(model, x, y)
    plan = calls.plan()

    def advance(key: str) -> None:
        if progress is not None:
            progress.set_description(f"{problem.name}: {key}", refresh=False)
            progress.update()

    before = cpu_snapshot()
    timings = measure_interleaved(plan, repeats, warmup, device, callback=advance)
    busy = contention(before, cpu_snapshot())
    memory = {key: peak_memory(fn, device, setup=setup) for key, (fn, setup) in plan.items()}
    diagnostics = calls.diagnostics()
    ratios = {}
    for key in RATIOS:
        numerator, denominator = key.split("/")
        ratios[key] = ratio_of(timings[numerator]["median_s"], timings[denominator]["median_s"])
    return {
        "title": problem.title,
        "model": repr(model),
        "batch_size": n,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "loss": diagnostics["loss"],
        "timings": timings,
        "memory": memory,
        "contention": busy,
        "ratios": ratios,
        "cg_iterations": diagnostics["cg_iterations"],
        "blocks": diagnostics["blocks"],
        "parameters_finite_after_steps": diagnostics["parameters_finite_after_steps"],
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """All problems of ``args``; the full results dictionary (what ``results.json`` holds)."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    results: Dict[str, Any] = {
        "benchmark": "foundation",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "device": args.device,
            "quick": args.quick,
            "threads": args.threads,
            "problems": list(args.problems),
            "batch_size_override": args.batch_size,
            "curvatures": list(CURVATURES),
            "step_curvature": STEP_CURVATURE,
            "cg_newton": dict(CG_NEWTON),
            "sgd": dict(SGD),
            "dtype": str(torch.get_default_dtype()),
            "seed": SEED,
        },
        "environment": environment(device),
        "method": _method(device),
        "definitions": {"measurements": dict(MEASUREMENTS), "ratios": dict(RATIOS)},
        "goal": {"ratio": GOAL[0], "problem": "linear", "at_most": GOAL[1]},
        "problems": {},
    }
    start = cpu_snapshot()
    total = len(args.problems) * len(MEASUREMENTS) * (args.warmup + args.repeats)
    with tqdm(total=total, unit="call", disable=args.no_progress, file=sys.stderr) as bar:
        for name in args.problems:
            results["problems"][name] = run_problem(
                PROBLEMS[name], args.repeats, args.warmup, device, args.batch_size, bar
            )
    results["environment"]["load_average_end"] = load_average()
    results["environment"]["contention"] = contention(start, cpu_snapshot())
    return results


def _method(device: torch.device) -> Dict[str, str]:
    """How the numbers are taken (stored with the results)."""
    return {
        "timing": "median (and quartiles) of the timed calls after the warm-up calls; "
        "time.perf_counter, CUDA synchronized before and after each call; one process, one "
        "fixed batch per problem; untimed setup before every call; measurements of a "
        "problem interleaved round by round (each round calls every measurement once), so "
        "that load from other processes affects all of them alike",
        "contention": "per measurement, CPU time of other processes (and hypervisor steal) "
        "during its timed calls as a fraction of wall time x CPUs, from /proc/stat; near 0 "
        "means the machine was quiet",
        "parameters": "restored from a state_dict saved at initialization before every "
        "call (untimed), so every call starts from the same parameters with the same "
        "gradients and curvature and nothing drifts over the repeats",
        "ratios": "ratio of the medians of two measurements of the same run",
        "memory": MEMORY_KINDS[memory_method(device)],
        "memory_kind": memory_method(device),
    }
