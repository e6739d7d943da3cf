"""Retime the delayed-SGD training graph into a pipeline and check that the result is legal.

    >>> report = verify_delays([1, 1, 1, 1], [7, 5, 1, 0], schedule="layerpipe")
    >>> report.legal, report.message()
    (False, 'layer 3 (stage 2) needs 2 delays, has 1')

How (method.md sec 2): build `plan.graph.training_graph` with the given delays D(l) on each
gradient -> update edge, then apply the retiming r that puts

  * one register on every forward stage boundary F(last of stage k) -> F(first of k+1),
  * on every backward stage boundary one register for `layerpipe`, none for `pipedream`
    (1F1B passes input gradients on within the tick, which is why its delay is S, not 2 S),
  * K-1 registers on the label edge Y -> loss (a feed-forward cutset: latency only).

r is derived from that placement alone: r(X) = r(Y) = 0, r(F) counts forward boundaries
crossed, r(loss) = r(last F), r(B) adds the backward boundaries crossed, and the weight and
update nodes of a layer share r(F) so that the weight register stays on U -> W and the
forward reads the weights the last update wrote. r(v) is then the tick at which node v
handles microbatch 0 (tests check it against `plan.delays` and the schedule builder).

Retimed delays are w_r(e) = w(e) + r(v) - r(u) for e = u -> v. The checks:

  1. every w_r(e) >= 0 (the only edges that can fail are the gradient edges: the retiming
     takes r(B) - r(U) delays from them, the registers layer l's loop crosses);
  2. every loop W(l) -> ... -> U(l) -> W(l) keeps its delay count (enumerated, not assumed);
  3. no delay-free cycle, and the longest delay-free path spans one stage for `layerpipe`
     (for `pipedream` the backward is delay-free through all K stages by construction).

Surplus. Delays above the need are legal: a loop may hold more delay than the pipeline's
registers, and the surplus D(l) - need(l) stays on the gradient -> update edge, i.e. the
gradient waits in a FIFO that many ticks before the optimizer applies it. The input gradient
sent upstream is not held back, so upstream stages are unaffected; the update is exactly
delayed SGD with delay D(l). (The schedule view marks a stage's B at m + k + d_k, the tick
its gradient is applied.)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from layerpipe.errors import PlanError
from layerpipe.plan.delays import SCHEDULES
from layerpipe.plan.graph import Edge, Graph, node_names, training_graph

# registers on each backward stage boundary in the target pipeline
BACKWARD_REGISTERS = {"layerpipe": 1, "pipedream": 0}


def stage_retiming(graph: Graph, schedule: str = "layerpipe") -> dict[str, int]:
    """The retiming r(v) that places the stage registers described in the module docstring."""
    if schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    bwd = BACKWARD_REGISTERS[schedule]
    stage = [graph.nodes[node_names(l)[1]].stage for l in range(graph.num_layers)]
    r: dict[str, int] = {"X": 0, "Y": 0}
    crossed = 0
    for l in range(graph.num_layers):
        if l > 0 and stage[l] != stage[l - 1]:
            crossed += 1  # one forward register per boundary
        w, f, _, u = node_names(l)
        r[f] = r[w] = r[u] = crossed
    r["loss"] = crossed
    t = r["loss"]
    for l in reversed(range(graph.num_layers)):
        if l < graph.num_layers - 1 and stage[l] != stage[l + 1]:
            t += bwd
        r[node_names(l)[2]] = t
    return r


def retime(graph: Graph, r: dict[str, int]) -> Graph:
    """The retimed graph: w_r(u -> v) = w(u -> v) + r(v) - r(u)."""
    return graph.with_delays({(e.src, e.dst): e.delay + r[e.dst] - r[e.src] for e in graph.edges})


def layer_loops(graph: Graph, layer: int) -> list[list[Edge]]:
    """Every simple cycle through layer `layer`'s weight register U -> W and no other weight
    register, as edge lists starting at W (depth-first search over simple paths W -> ... -> U).

    These are all the cycles of the graph: without the register edges it is acyclic (W has no
    other input), and no cycle holds two registers (after U(j) -> W(j) a cycle must go on
    through F(j), B(j) or U(j), which already lie on its way into U(j)). The tests confirm
    it against a brute-force cycle search on small graphs.
    """
    w, _, _, u = node_names(layer)
    closing = graph.edge(u, w)
    # only nodes that can still reach U (without W or another weight register) lead anywhere:
    # pruning the rest keeps the search proportional to the loops found, not to dead ends
    pred: dict[str, list[str]] = {}
    for e in graph.edges:
        if e.kind != "register":
            pred.setdefault(e.dst, []).append(e.src)
    useful, stack = {u}, [u]
    while stack:
        for p in pred.get(stack.pop(), []):
            if p not in useful and p != w:
                useful.add(p)
                stack.append(p)
    loops: list[list[Edge]] = []
    path: list[Edge] = []
    on_path = {w}

    def dfs(node: str) -> None:
        for e in graph.out_edges(node):
            if e.dst == u:
                loops.append([*path, e, closing])
            elif e.dst in useful and e.dst not in on_path and e.kind != "register":
                on_path.add(e.dst)
                path.append(e)
                dfs(e.dst)
                path.pop()
                on_path.discard(e.dst)

    dfs(w)
    return loops


@dataclass(frozen=True)
class ShortLoop:
    """A layer whose loop holds fewer delays than the pipeline puts registers on it."""

    layer: int
    """0-based layer index (printed 1-based)."""
    stage: int
    needs: int
    """Registers the retimed loop crosses besides the weight register."""
    has: int
    """Delays the loop holds before retiming, besides the weight register."""

    def __str__(self) -> str:
        return f"layer {self.layer + 1} (stage {self.stage}) needs {self.needs} delays, has {self.has}"


@dataclass
class RetimingReport:
    """Outcome of `verify_delays`: the retiming, the retimed delays and every check."""

    schedule: str
    num_layers: int
    num_stages: int
    delays: list[int]
    """Per-layer delays D(l) placed on the gradient edges."""
    retiming: dict[str, int]
    retimed: Graph
    negative_edges: list[tuple[str, str, int]] = field(default_factory=list)
    """(src, dst, w_r) of every edge with a negative retimed delay."""
    short_loops: list[ShortLoop] = field(default_factory=list)
    """One entry per short layer, in forward order."""
    loops_checked: int = 0
    loops_changed: list[str] = field(default_factory=list)
    """Loops (as text) whose delay count the retiming changed: must stay empty."""
    delay_free_cycle: bool = False
    max_delay_free_span: int = 0
    """Most stages any delay-free path of the retimed graph touches."""
    expected_span: int = 1
    longest_delay_free_path: list[str] = field(default_factory=list)
    """Longest delay-free chain of computations (by node count), for information."""

    @property
    def required(self) -> list[int]:
        """Per-layer delays the retiming needs: r(B) - r(U)."""
        return [self.retiming[node_names(l)[2]] - self.retiming[node_names(l)[3]] for l in range(self.num_layers)]

    @property
    def surplus(self) -> list[int]:
        """Per-layer delay left on the gradient edge after retiming (negative when short)."""
        return [d - n for d, n in zip(self.delays, self.required)]

    @property
    def legal(self) -> bool:
        return (
            not self.negative_edges
            and not self.loops_changed
            and not self.delay_free_cycle
            and self.max_delay_free_span <= self.expected_span
        )

    def registers(self) -> dict[str, Any]:
        """Registers of the retimed pipeline: per forward and backward stage boundary, and on
        the label edge (the worked example of method.md sec 2)."""
        fwd, bwd = [], []
        for e in self.retimed.edges:
            a, b = self.retimed.nodes[e.src], self.retimed.nodes[e.dst]
            if a.stage is None or b.stage is None or a.stage == b.stage:
                continue
            if e.kind == "activation":
                fwd.append(e.delay)
            elif e.kind == "grad_input":
                bwd.append(e.delay)
        bwd.reverse()  # report boundaries in forward order, like the forward ones
        return {"forward": fwd, "backward": bwd, "label": self.retimed.edge("Y", "loss").delay}

    def message(self) -> str:
        """One line: the first failure, or a summary when legal."""
        if self.short_loops:
            return str(self.short_loops[0])
        if self.negative_edges:
            src, dst, w = self.negative_edges[0]
            return f"edge {src}->{dst} would need {w} delays after retiming"
        if self.loops_changed:
            return f"retiming changed the delay count of loop {self.loops_changed[0]}"
        if self.delay_free_cycle:
            return "the retimed graph has a cycle without delay"
        if self.max_delay_free_span > self.expected_span:
            return (
                f"a delay-free path spans {self.max_delay_free_span} stages, "
                f"the {self.schedule} pipeline allows {self.expected_span}"
            )
        return (
            f"legal: {self.num_layers} layers, {self.num_stages} stages, schedule {self.schedule}, "
            f"{self.loops_checked} loops keep their delays, delay-free paths span at most "
            f"{self.max_delay_free_span} stage{'s' if self.max_delay_free_span != 1 else ''}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "legal": self.legal,
            "message": self.message(),
            "schedule": self.schedule,
            "delays": list(self.delays),
            "required": self.required,
            "surplus": self.surplus,
            "registers": self.registers(),
            "loops_checked": self.loops_checked,
            "loops_changed": list(self.loops_changed),
            "negative_edges": [{"edge": f"{s}->{d}", "delay": w} for s, d, w in self.negative_edges],
            "short_loops": [
                {"layer": s.layer, "stage": s.stage, "needs": s.needs, "has": s.has} for s in self.short_loops
            ],
            "max_delay_free_span": self.max_delay_free_span,
            "expected_span": self.expected_span,
            "longest_delay_free_path": list(self.longest_delay_free_path),
        }


def _delay_free_paths(g: Graph) -> tuple[bool, int, list[str]]:
    """(has a delay-free cycle, most stages a delay-free path touches, longest such path)."""
    succ: dict[str, list[str]] = {n: [] for n in g.nodes}
    indeg = dict.fromkeys(g.nodes, 0)
    for e in g.edges:
        if e.delay == 0:
            succ[e.src].append(e.dst)
            indeg[e.dst] += 1
    order, ready = [], [n for n in g.nodes if indeg[n] == 0]
    while ready:  # Kahn: what is left over lies on a delay-free cycle
        n = ready.pop()
        order.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    if len(order) < len(g.nodes):
        return True, 0, []
    # the span of a path is set by its two extreme-stage nodes, which the path connects: so the
    # largest span is the largest |stage(u) - stage(v)| + 1 over pairs with u reaching v
    reach_lo = {n: g.nodes[n].stage for n in g.nodes}
    reach_hi = dict(reach_lo)
    for n in reversed(order):
        for m in succ[n]:
            for table, pick in ((reach_lo, min), (reach_hi, max)):
                if table[m] is not None:
                    table[n] = table[m] if table[n] is None else pick(table[n], table[m])
    span = 0
    for n, node in g.nodes.items():
        if node.stage is not None:
            span = max(span, node.stage - reach_lo[n] + 1, reach_hi[n] - node.stage + 1)
    # longest chain by node count, for the report
    best = {n: 1 for n in g.nodes}
    nxt: dict[str, str | None] = dict.fromkeys(g.nodes)
    for n in reversed(order):
        for m in succ[n]:
            if best[m] + 1 > best[n]:
                best[n], nxt[n] = best[m] + 1, m
    start = max(order, key=lambda n: best[n]) if order else None
    path = []
    while start is not None:
        path.append(start)
        start = nxt[start]
    return False, span, path


def expand_delays(stage_sizes: Sequence[int], delays: Sequence[int]) -> list[int]:
    """Per-layer delays from one delay per stage (len K) or per layer (len L)."""
    num_layers, num_stages = sum(stage_sizes), len(stage_sizes)
    values = [int(d) for d in delays]
    if len(values) == num_stages:
        values = [d for d, n in zip(values, stage_sizes) for _ in range(n)]
    elif len(values) != num_layers:
        raise PlanError(
            f"{len(values)} delays given but the plan has {num_stages} stages"
            + (f" and {num_layers} layers" if num_layers != num_stages else "")
        )
    if any(d < 0 for d in values):
        raise PlanError(f"delays must be >= 0, got {','.join(map(str, delays))}")
    return values


def verify_delays(stage_sizes: Sequence[int], delays: Sequence[int], schedule: str = "layerpipe") -> RetimingReport:
    """Build the graph for the partition `stage_sizes` (layers per stage) with `delays` (one
    per stage or one per layer), retime it into the `schedule`'s pipeline and check it."""
    per_layer = expand_delays(stage_sizes, delays)
    stage_of_layer = [k for k, n in enumerate(stage_sizes) for _ in range(n)]
    graph = training_graph(stage_of_layer, per_layer)
    r = stage_retiming(graph, schedule)
    retimed = retime(graph, r)
    report = RetimingReport(
        schedule=schedule,
        num_layers=graph.num_layers,
        num_stages=graph.num_stages,
        delays=per_layer,
        retiming=r,
        retimed=retimed,
        expected_span=1 if BACKWARD_REGISTERS[schedule] else graph.num_stages,
    )
    report.negative_edges = [(e.src, e.dst, e.delay) for e in retimed.edges if e.delay < 0]
    for l in range(graph.num_layers):
        before_loops = layer_loops(graph, l)
        after_loops = layer_loops(retimed, l)  # same edge order: the graphs share their structure
        short: ShortLoop | None = None
        for before, after in zip(before_loops, after_loops):
            report.loops_checked += 1
            if sum(e.delay for e in before) != sum(e.delay for e in after):
                report.loops_changed.append(" -> ".join([e.src for e in before] + [before[0].src]))
            if short is None and any(e.delay < 0 for e in after):
                register = sum(e.delay for e in before if e.kind == "register")
                short = ShortLoop(
                    layer=l,
                    stage=graph.nodes[node_names(l)[0]].stage or 0,
                    needs=sum(e.delay for e in after if e.kind not in ("gradient", "register")),
                    has=sum(e.delay for e in before) - register,
                )
        if short is not None:
            report.short_loops.append(short)
    cycle, span, path = _delay_free_paths(retimed)
    report.delay_free_cycle, report.max_delay_free_span, report.longest_delay_free_path = cycle, span, path
    return report
