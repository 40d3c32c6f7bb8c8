"""The section's Markdown tables and its bar chart (``language_models.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import others_share

__all__ = ["markdown", "plot"]


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}"


def _gb(nbytes: Optional[float]) -> str:
    return "–" if nbytes is None else f"{nbytes / 1e9:.2f}"


def _memory_cell(result: Dict[str, Any], method: str) -> str:
    mem = result["memory"].get(method, {})
    if mem.get("status") != "ok":
        return mem.get("status", "–")
    return _gb(mem["peak_bytes"] - mem["rss_imports_bytes"])


def _table(result: Dict[str, Any]) -> List[str]:
    lines = [
        "| candidate | library | median [s] (q25–q75) | CPU [s] | / gradient (wall) | "
        "/ gradient (CPU) | floor | peak above imports [GB] | / gradient's | call [GB] | "
        "/ gradient's | tensor peak [GB] | / gradient's | others' CPU | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if r["status"] == "ok":
            times = f"{_num(r['median_s'])} ({_num(r['q25_s'])}–{_num(r['q75_s'])})"
            cpu, ratio, cpu_ratio = (
                _num(r["cpu_median_s"]),
                f"**{_num(r['ratio'])}**",
                _num(r["cpu_ratio"]),
            )
            note = ""
            others = others_share(r.get("contention"))
        else:
            times = cpu = ratio = cpu_ratio = others = "n/a"
            note = r.get("reason", "")
        mem = _memory_cell(result, r["method"])
        mem_ratio = _num(r.get("memory_ratio")) if "memory_ratio" in r else "–"
        call = result["memory"].get(r["method"], {}).get("call")
        call_gb = _gb(call["delta_bytes"]) if call else "–"
        call_ratio = _num(r.get("call_delta_ratio")) if "call_delta_ratio" in r else "–"
        tensor_gb = _gb(r.get("tensor_peak_bytes"))
        tensor_ratio = _num(r.get("tensor_memory_ratio"))
        if r["key"] == "curvlinops KFAC":
            layers = result["blocks"]["curvlinops_kfac_layers"]
            covered = f"covers {result['blocks']['curvlinops_kfac']} blocks"
            covered += f" ({len(layers)} nn.Linear)"
            note = f"{covered}; {note}" if note else covered
        lines.append(
            f"| {r['key']} | {r['library']} | {times} | {cpu} | {ratio} | {cpu_ratio} | "
            f"{_num(r.get('floor'))} | {mem} | {mem_ratio} | {call_gb} | {call_ratio} | "
            f"{tensor_gb} | {tensor_ratio} | {others} | {note} |"
        )
    return lines


def _goals(result: Dict[str, Any]) -> List[str]:
    lines = ["| goal | value | floor | status |", "|---|---:|---:|---|"]
    for g in result["goals"]:
        value = g["value"]
        if isinstance(value, dict):
            big = value
            value = f"largest tensor {big.get('shape')} ({big.get('numel', 0):,} entries)"
            if big.get("vxv_shapes"):
                value += f"; V x V tensors: {big['vxv_shapes']}"
        elif isinstance(value, float):
            value = _num(value)
        else:
            value = "–" if value is None else str(value)
        note = f" ({g['note']})" if g.get("note") else ""
        lines.append(f"| {g['goal']}{note} | {value} | {_num(g.get('floor'))} | {g['status']} |")
    return lines


def _summary(result: Dict[str, Any]) -> List[str]:
    """One line per model: the goals' values (floors in brackets) and their status."""
    lines = [
        "| model | kfac pass / gradient (floor) | fwd + bwd + kfac / curvlinops KFAC | kfac "
        "peak / gradient's (RSS; tensors) | diag pass / gradient (floor) | exact product / "
        "gradient (floor) | dense V x V held |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        if "goals" not in model:
            continue
        cells = []
        for g in model["goals"][:4]:
            if g["value"] is None:
                cells.append(g["status"])
                continue
            floor = f" ({_num(g['floor'])})" if g.get("floor") is not None else ""
            cells.append(f"{_num(g['value'])}{floor}: {g['status']}")
            tensors = model["goals"][5] if len(model["goals"]) > 5 else None
            if "peak memory" in g["goal"] and tensors and tensors["value"] is not None:
                cells[-1] += f"; {_num(tensors['value'])}: {tensors['status']}"
        exact = "–"
        for group in (model, model.get("fallback") or {}):
            row = next((r for r in group.get("rows", []) if r["key"] == "exact product"), {})
            if row.get("status") == "ok":
                at = "" if group is model else f" at {group['model']['name']}"
                exact = f"{_num(row['ratio'])} ({_num(row['floor'])}){at}"
                break
        dense = model["goals"][4]["status"]
        lines.append(f"| {name} | {' | '.join(cells)} | {exact} | {dense} |")
    return lines + [""]


def _model_section(name: str, result: Dict[str, Any], heading: str = "###") -> List[str]:
    if "error" in result:
        return [f"{heading} {name}: failed", "", f"`{result['error']}`", ""]
    spec = result["model"]
    f = result["floors"]
    load = result["load_average"]
    lines = [
        f"{heading} {name}: {spec['description']}",
        "",
        f"{result['parameters']:,} parameters ({result['blocks']['curvgraph']} blocks), batch "
        f"{spec['N']} x {spec['T']} tokens, float32, cross-entropy (mean over tokens), eval "
        f"mode. {result['threads']} torch thread(s); {result['repeats']} timed round(s) after "
        f"{result['warmup']} warm-up round(s), candidates interleaved; tracing took "
        f"{result['trace_s']:.1f} s (not timed). Load average (1, 5, 15 min) "
        f"{load['start']} at the start of the timed rounds, {load['end']} at the end. "
        f"Gradient: {f['gradient_flops'] / 1e9:.2f} GFLOP (matrix products; forward "
        f"{f['forward_flops'] / 1e9:.2f}, backward {f['backward_flops'] / 1e9:.2f}).",
        "",
    ]
    lines += _table(result)
    lines += [""] + (_goals(result) + [""] if heading == "###" else [])
    if "fallback" in result:
        fb = result["fallback"]
        lines += [
            f"Methods that did not fit {name} (reasons above), measured on "
            f"**{fb.get('model', {}).get('name', '?')}** beside its own gradient:",
            "",
        ]
        if "error" in fb:
            lines += [f"failed: `{fb['error']}`", ""]
        else:
            lines += _model_section(fb["model"]["name"], fb, heading=heading + "#")
    return lines


def markdown(result: Dict[str, Any]) -> str:
    """All tables of the section."""
    env = result["environment"]
    commit = (env.get("git_commit") or "unknown")[:12] + (
        " (with local changes)" if env.get("git_dirty") else ""
    )
    lines = [
        f"## Language models ({result['suite']})",
        "",
        "Ratios: median time of each candidate / median time of a plain gradient (zero_grad, "
        "forward, cross-entropy, backward) of the same model and batch, measured in one "
        "process, candidates interleaved round by round; wall time (`perf_counter`) and the "
        "process's CPU time (`process_time`). Peak memory: each method's whole work "
        "(forward + backward + method; curvlinops: construction + its own passes) once in a "
        "fresh process; `peak above imports` = the process's peak RSS (`VmHWM`) minus its RSS "
        "after importing torch, transformers, curvgraph (and curvlinops): model, batch, "
        "trace and the work; `call` = the peak RSS during the work minus the RSS just "
        "before it (model, batch and trace excluded); `tensor peak` = the same work's peak "
        "counted in tensors (torch.profiler memory events, the tensors alive before it "
        "included; `benchmarks/tensor_memory.py`) in another fresh process: RSS also counts "
        "freed heap pages glibc keeps. "
        "Floors: least matrix-product work as a multiple of the gradient's "
        "(`benchmarks/language_models/floors.py`; goals below their floor are marked). "
        f"curvgraph commit {commit}; torch {env.get('torch')}; {env.get('device_name')}; "
        f"{env.get('cpus_available')} CPUs; load average {env.get('load_average')} at the "
        f"start, {env.get('load_average_end')} at the end; total wall time "
        f"{result.get('wall_s', 0):.0f} s.",
        "",
    ]
    lines += _summary(result)
    for name, model in result["models"].items():
        lines += _model_section(name, model)
    return "\n".join(lines).rstrip() + "\n"


def _bars(result: Dict[str, Any]) -> List[tuple]:
    bars = []
    for name, model in result["models"].items():
        for group in (model, model.get("fallback") or {}):
            if "rows" not in group:
                continue
            label = group["model"]["name"]
            if label != name:
                label += f" (what did not fit {name})"
            for r in group["rows"]:
                if r["key"] != "gradient" and r.get("status") == "ok":
                    bars.append((label, r["key"], r["library"], r["ratio"], r.get("floor")))
    return bars


def plot(result: Dict[str, Any], out: Path, name: str = "language_models.png") -> List[Path]:
    """Bars of every candidate's ratio to the gradient, per model, floors as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = _bars(result)
    if not bars:
        return []
    models = list(dict.fromkeys(b[0] for b in bars))
    colours = {"curvgraph": "tab:blue", "curvlinops": "tab:orange", "torch": "tab:gray"}
    heights = [2 + sum(b[0] == m for b in bars) for m in models]
    figure, axes = plt.subplots(
        len(models),
        1,
        figsize=(9, 0.8 + 0.3 * sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, model in zip(axes[:, 0], models):
        rows = [b for b in bars if b[0] == model]
        ys = list(range(len(rows)))
        ax.barh(ys, [b[3] for b in rows], color=[colours.get(b[2], "k") for b in rows])
        for y, b in zip(ys, rows):
            if b[4] is not None:
                ax.plot([b[4], b[4]], [y - 0.4, y + 0.4], color="k", lw=2)
            ax.text(b[3], y, f" {b[3]:.2g}", va="center", fontsize=7)
        ax.set_yticks(ys, [b[1] for b in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_title(f"{model}: time / gradient (black tick: floor)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[0, 0].legend(handles, list(colours), fontsize=7, loc="lower right")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
