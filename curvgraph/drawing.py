"""A readable drawing of a traced graph: layered top-down, chains merged, repeats collapsed.

What :meth:`curvgraph.inspection.InspectionReport.plot` draws. The layout is computed here
in points (1/72 inch) with a monospace font, so the size of every label is known before
anything is drawn:

1. **Segments.** In the graph's (topological) order, a node ``c`` is a *cut point* when no
   edge jumps over it (no ``u -> w`` with ``u < c < w``): everything after it depends on
   what came before only through it. The nodes between two cut points form a segment (a
   residual block, a transformer block's attention or MLP half). Edges from *shared*
   nodes (a shape or a mask used by ``>= 3`` nodes far apart, with no parameter
   upstream; a weight used twice) are not drawn and do not count; such a node's box says
   how many nodes use it.
2. **Repeats.** A run of segments that repeats ``N >= 2`` times in a row with the same
   structure (ops, rule kinds, wiring, parameter and output shapes) is drawn once, framed,
   with ``x N`` and the first node of its first and last copy.
3. **Chains.** A node whose only successor has it as only predecessor (same rule kind) shares
   that successor's box: a box lists its nodes one per line.
4. **Layers.** Boxes are ranked by the longest path from the inputs (a source such as a
   constant sits right above its first consumer), ordered in each rank by the barycenter of
   their predecessors, and laid side by side without overlap. An edge over more than one
   rank is routed on the right of the boxes it passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["DrawNode", "Layout", "draw", "layout"]

FONT = 7.0  #: label font size (points)
CHAR = 0.625 * FONT  #: width of one character of DejaVu Sans Mono (0.602 em), rounded up
LINE = 1.3 * FONT  #: line height
PAD = 3.0  #: padding inside a box
GAP_X, GAP_Y = 10.0, 16.0  #: between boxes of one rank, between ranks
LANE = 5.0  #: distance between routed long edges
SHARED_USES, SHARED_SPAN = 3, 12  #: a node used this often, this far apart, is shared
MAX_PERIOD = 12  #: the most segments one repeated unit may span
MAX_PIXELS = 30000  #: the figure's longer side, in pixels, at most


@dataclass
class DrawNode:
    """One node to draw: its ``name``, short ``op``, rule ``kind`` and input node names.

    ``detail``: anything hashable that must agree for two copies of a block to count as
    the same (parameter shapes, output shape). ``parameters``: whether it uses parameters
    (only a node without any upstream can be shared).
    """

    name: str
    op: str
    kind: str
    inputs: Tuple[str, ...] = ()
    detail: tuple = ()
    parameters: bool = False  # uses parameters (a weight read as an attribute: True)


@dataclass
class Box:
    """A drawn box: its lines, rule kind and geometry (points, ``y`` grows downwards)."""

    nodes: List[str]
    lines: List[str]
    kind: str
    rank: int = 0
    x: float = 0.0  # left
    y: float = 0.0  # top
    width: float = 0.0
    height: float = 0.0

    @property
    def center(self) -> float:  # noqa: D102
        return self.x + self.width / 2


@dataclass
class Frame:
    """A repeated unit drawn once: the rectangle around its boxes and its label."""

    nodes: List[int]  # the first copy's nodes (indices)
    label: str
    boxes: List[int] = field(default_factory=list)
    rect: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x0, y0, x1, y1


@dataclass
class Layout:
    """Boxes, edges (polylines) and frames, in points; ``width`` x ``height`` overall."""

    boxes: List[Box]
    edges: List[List[Tuple[float, float]]] = field(default_factory=list)
    frames: List[Frame] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def layout(nodes: Sequence[DrawNode]) -> Layout:
    """The layout of ``nodes`` (given in topological order); see the module docstring.

    An attribute node (``kind == "attribute"``, a weight read directly) used once is a line
    of its user's box; one used more often is shared.
    """
    uses: Dict[str, List[str]] = {}
    for n in nodes:
        for s in n.inputs:
            uses.setdefault(s, []).append(n.name)
    notes: Dict[str, List[str]] = {}
    for n in nodes:
        if n.kind == "attribute" and len(uses.get(n.name, ())) == 1:
            notes.setdefault(uses[n.name][0], []).append(f"  + {n.name}")
    nodes = [n for n in nodes if not (n.kind == "attribute" and len(uses.get(n.name, ())) == 1)]
    index = {n.name: i for i, n in enumerate(nodes)}
    edges = [(index[s], i) for i, n in enumerate(nodes) for s in n.inputs if s in index]
    users: Dict[int, List[int]] = {}
    for s, t in edges:
        users.setdefault(s, []).append(t)
    carries = [False] * len(nodes)  # depends on a parameter
    for i, n in enumerate(nodes):
        carries[i] = n.parameters or any(carries[index[s]] for s in n.inputs if s in index)
    shared = {
        s
        for s, ts in users.items()
        if (len(ts) >= SHARED_USES and max(ts) - min(ts) >= SHARED_SPAN and not carries[s])
        or (nodes[s].kind == "attribute" and len(ts) > 1)
    }
    edges = [(s, t) for s, t in edges if s not in shared]
    alias, frames = _collapse_repeats(nodes, edges, shared)
    drawn = sorted(set(alias.values()))
    mapped = {(alias[s], alias[t]) for s, t in edges}
    mapped = sorted((s, t) for s, t in mapped if s < t)  # copies' edges back into the first
    box_of, boxes = _chains(nodes, drawn, mapped, frames, users, shared, notes)
    box_edges = sorted({(box_of[s], box_of[t]) for s, t in mapped if box_of[s] != box_of[t]})
    for frame in frames:
        frame.boxes = sorted({box_of[i] for i in frame.nodes})
    _rank(boxes, box_edges, frames)
    _place(boxes, box_edges)
    result = Layout(boxes, frames=frames)
    _route(result, box_edges)
    _frame(result)
    return result


def _collapse_repeats(nodes, edges, shared) -> Tuple[Dict[int, int], List[Frame]]:
    """Node -> the node drawn for it (itself, or its counterpart in a repeat's first copy)."""
    count = len(nodes)
    reach = [0] * (count + 1)  # furthest target of an edge from a node before i
    for s, t in edges:
        reach[s + 1] = max(reach[s + 1], t)
    furthest = 0
    cuts = []
    for i in range(count):
        furthest = max(furthest, reach[i])
        if furthest <= i:
            cuts.append(i)
    bounds = list(zip([-1] + cuts, cuts + ([count - 1] if cuts[-1:] != [count - 1] else [])))
    segments = [list(range(a + 1, b + 1)) for a, b in bounds if b > a]
    inputs = {}
    for s, t in edges:
        inputs.setdefault(t, []).append(s)
    shared_names = {nodes[s].name for s in shared}
    signatures = [_signature(nodes, segment, inputs, shared_names) for segment in segments]
    alias = {i: i for i in range(count)}
    frames = []
    i = 0
    while i < len(segments):
        period, copies = _best_repeat(signatures, i)
        unit = [n for segment in segments[i : i + period] for n in segment]
        if copies < 2 or len(unit) < 2:
            i += 1
            continue
        for copy in range(1, copies):
            start = i + copy * period
            others = [n for segment in segments[start : start + period] for n in segment]
            alias.update(zip(others, unit))
        last = [n for segment in segments[i + (copies - 1) * period :][:period] for n in segment]
        label = f"\u00d7 {copies}  ({nodes[unit[0]].name} ... {nodes[last[0]].name})"
        frames.append(Frame(unit, label))
        i += period * copies
    return alias, frames


def _signature(nodes, segment: List[int], inputs, shared_names) -> tuple:
    """What two copies of a block share: ops, kinds, details and wiring (not names)."""
    position = {n: k for k, n in enumerate(segment)}
    return tuple(
        (
            nodes[n].op,
            nodes[n].kind,
            nodes[n].detail,
            tuple(position.get(s, "entry") for s in inputs.get(n, ())),
            tuple(s for s in nodes[n].inputs if s in shared_names),  # the same shape, mask
        )
        for n in segment
    )


def _best_repeat(signatures, i: int) -> Tuple[int, int]:
    """``(period, copies)`` covering the most segments from ``i`` (shortest period first)."""
    best = (1, 1)
    for period in range(1, min(MAX_PERIOD, (len(signatures) - i) // 2) + 1):
        unit = signatures[i : i + period]
        copies = 1
        while signatures[i + copies * period : i + (copies + 1) * period] == unit:
            copies += 1
        if copies >= 2 and period * copies > best[0] * best[1]:
            best = (period, copies)
    return best


def _chains(nodes, drawn, edges, frames, users, shared, notes):
    """Boxes: chains of nodes (one successor, one predecessor, same kind) share one.

    Returns node -> box index, and the boxes.
    """
    successors: Dict[int, List[int]] = {}
    predecessors: Dict[int, List[int]] = {}
    for s, t in edges:
        successors.setdefault(s, []).append(t)
        predecessors.setdefault(t, []).append(s)
    group = {n: k for k, frame in enumerate(frames) for n in frame.nodes}
    box_of: Dict[int, int] = {}
    boxes: List[Box] = []
    for n in drawn:
        node = nodes[n]
        lines = [_line(node)] + notes.get(node.name, [])
        if n in shared:
            lines[0] += f"  (used by {len(users[n])} nodes)"
        pred = predecessors.get(n, [])
        if (
            len(pred) == 1
            and successors.get(pred[0]) == [n]
            and nodes[pred[0]].kind == node.kind
            and node.kind not in ("input", "output")
            and group.get(pred[0]) == group.get(n)
            and n not in shared
            and pred[0] not in shared
        ):
            box_of[n] = box_of[pred[0]]
            boxes[box_of[n]].nodes.append(node.name)
            boxes[box_of[n]].lines.extend(lines)
        else:
            box_of[n] = len(boxes)
            boxes.append(Box([node.name], lines, node.kind))
    return box_of, boxes


def _line(node: DrawNode) -> str:
    """``name: op``, or the name alone where it already says the op (``add_1``)."""
    if node.kind in ("input", "output"):
        return node.name if node.name == node.kind else f"{node.name}: {node.kind}"
    base = node.name.rstrip("0123456789").rstrip("_")
    if "::" in node.op:  # an ATen spelling, aten::le.Tensor: the name without overload
        op = node.op.split("::")[-1].split(".")[0]
    else:
        op = node.op if node.op.startswith("Tensor.") else node.op.split(".")[-1]
    if base.lower() == op.lower().split("[")[0] or not op:
        return node.name
    return f"{node.name}: {op}"


def _rank(boxes: List[Box], edges, frames: List[Frame]) -> None:
    """Longest path from the inputs; a source that is no input sits above its first user.

    An isolated box of a repeated unit (a constant nobody uses) sits in its unit's first rank.
    """
    preds: Dict[int, List[int]] = {}
    succs: Dict[int, List[int]] = {}
    for s, t in edges:
        preds.setdefault(t, []).append(s)
        succs.setdefault(s, []).append(t)
    for b, box in enumerate(boxes):
        box.rank = 1 + max((boxes[p].rank for p in preds.get(b, ())), default=-1)
    for b in reversed(range(len(boxes))):
        if b not in preds and b in succs and boxes[b].kind != "input":
            boxes[b].rank = max(0, min(boxes[t].rank for t in succs[b]) - 1)
    for frame in frames:
        connected = [boxes[b].rank for b in frame.boxes if b in preds]
        for b in frame.boxes:
            if b not in preds and b not in succs and connected:
                boxes[b].rank = min(connected)


def _place(boxes: List[Box], edges) -> None:
    """Sizes from the lines; ranks top-down; in a rank, by the predecessors' barycenter."""
    for box in boxes:
        box.width = max(len(line) for line in box.lines) * CHAR + 2 * PAD
        box.height = len(box.lines) * LINE + 2 * PAD
    preds: Dict[int, List[int]] = {}
    for s, t in edges:
        preds.setdefault(t, []).append(s)
    ranks: Dict[int, List[int]] = {}
    for b, box in enumerate(boxes):
        ranks.setdefault(box.rank, []).append(b)
    y = 0.0
    for rank in sorted(ranks):
        members = ranks[rank]
        wanted = {
            b: sum(boxes[p].center for p in preds[b]) / len(preds[b]) if b in preds else None
            for b in members
        }
        known = [w for w in wanted.values() if w is not None]
        middle = sum(known) / len(known) if known else 0.0
        members.sort(key=lambda b: (middle if wanted[b] is None else wanted[b], b))
        total = sum(boxes[b].width for b in members) + GAP_X * (len(members) - 1)
        x = middle - total / 2
        for b in members:
            boxes[b].x, boxes[b].y = x, y
            x += boxes[b].width + GAP_X
        y += max(boxes[b].height for b in members) + GAP_Y
    left = min(box.x for box in boxes)
    for box in boxes:
        box.x -= left


def _route(result: Layout, edges) -> None:
    """Straight edges between adjacent ranks; longer ones on the right of what they pass.

    The long edges of one source share a vertical lane, with a branch to each target.
    """
    boxes = result.boxes
    long: Dict[int, List[int]] = {}
    for s, t in edges:
        a, b = boxes[s], boxes[t]
        if b.rank - a.rank <= 1:
            result.edges.append([(a.center, a.y + a.height), (b.center, b.y)])
        else:
            long.setdefault(s, []).append(t)
    lanes: List[Tuple[float, float, float]] = []  # (x, y_top, y_bottom)
    reach = {s: max(boxes[t].rank for t in ts) for s, ts in long.items()}
    for s in sorted(long, key=lambda s: (reach[s] - boxes[s].rank, s)):
        a = boxes[s]
        targets = sorted(long[s], key=lambda t: boxes[t].rank)
        top = a.y + a.height + GAP_Y / 3
        bottom = boxes[targets[-1]].y - GAP_Y / 3
        passed = [box.x + box.width for box in boxes if a.rank < box.rank < reach[s]]
        x = max(passed) + LANE
        while any(abs(x - lx) < LANE / 2 and top < lb and lt < bottom for lx, lt, lb in lanes):
            x += LANE
        lanes.append((x, top, bottom))
        start = (a.center, a.y + a.height)
        for k, t in enumerate(targets):
            b = boxes[t]
            branch = [(x, b.y - GAP_Y / 3), (b.center, b.y - GAP_Y / 3), (b.center, b.y)]
            trunk = [start, (start[0], top), (x, top)] if k == 0 else []
            result.edges.append(trunk + branch)


def _frame(result: Layout) -> None:
    """Frames around repeated units; their labels in a column right of everything."""
    boxes = result.boxes
    right = max(
        [box.x + box.width for box in boxes] + [x for edge in result.edges for x, _ in edge]
    )
    for frame in result.frames:
        members = [boxes[b] for b in frame.boxes]
        y0 = min(box.y for box in members) - GAP_Y / 3
        y1 = max(box.y + box.height for box in members) + GAP_Y / 3
        x0 = min(box.x for box in members) - GAP_X / 2
        frame.rect = (x0, y0, right + GAP_X, y1)
    label = max((len(frame.label) for frame in result.frames), default=0) * CHAR
    result.width = right + GAP_X + (label + 2 * GAP_X if result.frames else 0)
    result.height = max(box.y + box.height for box in boxes)


def draw(graph: Layout, title: str, colours: Dict[str, str], legend: Optional[list] = None):
    """The figure of ``graph``: one point of the layout is one point of the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    kinds = legend or sorted({box.kind for box in graph.boxes})
    margin, header = 12.0, 3 * LINE + 2 * FONT
    width = max(graph.width, len(title) * CHAR * 1.2, _legend_width(kinds)) + 2 * margin
    height = graph.height + header + 2 * margin
    dpi = min(100.0, MAX_PIXELS / (max(width, height) / 72))
    figure = plt.figure(figsize=(width / 72, height / 72), dpi=dpi)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(-margin, width - margin)
    axes.set_ylim(graph.height + margin, -header - margin)  # y grows downwards
    axes.set_axis_off()
    text = dict(family="DejaVu Sans Mono", fontsize=FONT, va="top", ha="left")
    axes.text(0, -header, title, **{**text, "fontsize": FONT * 1.2, "weight": "bold"})
    x = 0.0
    for kind in kinds:
        axes.add_patch(Rectangle((x, -header / 2 - FONT), FONT, FONT, color=colours[kind]))
        axes.text(x + FONT * 1.5, -header / 2 - FONT, kind, **text)
        x += (len(kind) + 4) * CHAR + FONT
    for frame in graph.frames:
        x0, y0, x1, y1 = frame.rect
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=0.8))
        axes.text(x1 + GAP_X / 2, y0 + PAD, frame.label, **{**text, "weight": "bold"})
    for edge in graph.edges:
        xs, ys = zip(*edge)
        axes.plot(xs, ys, color="0.55", lw=0.6, zorder=1)
        axes.plot([xs[-1]], [ys[-1]], marker="v", color="0.55", ms=2.5, zorder=1)
    for box in graph.boxes:
        axes.add_patch(
            FancyBboxPatch(
                (box.x, box.y),
                box.width,
                box.height,
                boxstyle="round,pad=0,rounding_size=2",
                facecolor=colours[box.kind],
                alpha=0.25,
                edgecolor=colours[box.kind],
                zorder=2,
            )
        )
        axes.text(box.x + PAD, box.y + PAD, "\n".join(box.lines), linespacing=1.3, **text)
    return figure


def _legend_width(kinds) -> float:
    return sum((len(kind) + 4) * CHAR + FONT for kind in kinds)
