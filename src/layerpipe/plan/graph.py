"""The training data-flow graph of one SGD step, with delays on its edges (method.md sec 1-2).

    >>> g = training_graph(stage_of_layer=[0, 1, 2, 3], gradient_delays=[6, 4, 2, 0])
    >>> g.edge("B1", "U1").delay, g.edge("U1", "W1").delay
    (6, 1)

Nodes, per layer l (numbered from 1 in names, as in method.md): `W{l}` the weights, `F{l}`
the forward, `B{l}` the backward (input and weight gradient), `U{l}` the optimizer update;
plus `X` (input samples), `Y` (labels) and `loss`. Edges and their delays before retiming:

    X -> F1 -> F2 -> ... -> FL -> loss      activations, 0
    Y -> loss                               labels, 0
    loss -> BL -> ... -> B2 -> B1           input gradients, 0
    F{l} -> B{l}                            activations saved for the backward, 0
    W{l} -> F{l}, W{l} -> B{l}              weights read by forward and backward, 0
    W{l} -> U{l}                            the update reads the current weights, 0
    B{l} -> U{l}                            the weight gradient: D(l) delays (DLMS)
    U{l} -> W{l}                            the weight register: 1 delay

Plain SGD is D(l) = 0: every loop W{l} -> ... -> U{l} -> W{l} then holds only the weight
register, and no retiming can pipeline it. Delayed SGD adds the D(l) gradient delays that
`plan.retiming` moves onto the stage boundaries.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from layerpipe.errors import PlanError


@dataclass(frozen=True)
class Node:
    """A computation (or an input) of the training step."""

    name: str
    kind: str
    """One of "input", "label", "forward", "loss", "backward", "update", "weight"."""
    layer: int | None = None
    """0-based layer index; None for X, Y and loss."""
    stage: int | None = None
    """0-based stage; None for the inputs X and Y (they live outside the pipeline)."""


@dataclass(frozen=True)
class Edge:
    """A data dependency `src -> dst` through `delay` registers (ticks)."""

    src: str
    dst: str
    delay: int
    kind: str
    """What travels on it: "activation", "label", "saved", "grad_input", "weight",
    "gradient" (the DLMS edge) or "register" (the weight register)."""


@dataclass
class Graph:
    """Nodes by name and edges in insertion order (deterministic, so reports are too)."""

    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    num_layers: int = 0
    num_stages: int = 0
    # successor lists, kept in step with `edges` so that loop enumeration is not O(E) per step
    _out: dict[str, list[Edge]] = field(default_factory=dict, repr=False, compare=False)

    def add_node(self, node: Node) -> None:
        self.nodes[node.name] = node

    def add_edge(self, src: str, dst: str, delay: int, kind: str) -> None:
        if src not in self.nodes or dst not in self.nodes:
            raise ValueError(f"edge {src}->{dst} names an unknown node")
        e = Edge(src, dst, delay, kind)
        self.edges.append(e)
        self._out.setdefault(src, []).append(e)

    def edge(self, src: str, dst: str) -> Edge:
        """The (unique) edge from `src` to `dst`."""
        for e in self.edges:
            if e.src == src and e.dst == dst:
                return e
        raise KeyError(f"{src}->{dst}")

    def out_edges(self, name: str) -> list[Edge]:
        return self._out.get(name, [])

    def with_delays(self, delays: dict[tuple[str, str], int]) -> Graph:
        """A copy with the edge delays replaced (used to build the retimed graph)."""
        g = Graph(nodes=dict(self.nodes), num_layers=self.num_layers, num_stages=self.num_stages)
        for e in self.edges:
            g.add_edge(e.src, e.dst, delays[(e.src, e.dst)], e.kind)
        return g


def node_names(layer: int) -> tuple[str, str, str, str]:
    """Names of the weight, forward, backward and update nodes of a 0-based layer."""
    n = layer + 1
    return f"W{n}", f"F{n}", f"B{n}", f"U{n}"


def training_graph(stage_of_layer: Sequence[int], gradient_delays: Sequence[int]) -> Graph:
    """Build the graph for layers placed on stages `stage_of_layer` (0-based, non-decreasing,
    starting at 0, no gaps), with `gradient_delays[l]` delays on layer l's gradient edge."""
    num_layers = len(stage_of_layer)
    if num_layers < 1:
        raise PlanError("the model has no layers")
    if len(gradient_delays) != num_layers:
        raise PlanError(f"{len(gradient_delays)} delays given for {num_layers} layers")
    if stage_of_layer[0] != 0 or any(b - a not in (0, 1) for a, b in zip(stage_of_layer, stage_of_layer[1:])):
        raise PlanError(f"stages must run 0, 1, 2, ... in forward order, got {list(stage_of_layer)}")
    if any(d < 0 for d in gradient_delays):
        raise PlanError(f"delays must be >= 0, got {list(gradient_delays)}")
    last = stage_of_layer[-1]
    g = Graph(num_layers=num_layers, num_stages=last + 1)
    g.add_node(Node("X", "input"))
    g.add_node(Node("Y", "label"))
    g.add_node(Node("loss", "loss", stage=last))
    for l, k in enumerate(stage_of_layer):
        w, f, b, u = node_names(l)
        g.add_node(Node(w, "weight", l, k))
        g.add_node(Node(f, "forward", l, k))
        g.add_node(Node(b, "backward", l, k))
        g.add_node(Node(u, "update", l, k))
    # forward chain and loss
    prev = "X"
    for l in range(num_layers):
        _, f, _, _ = node_names(l)
        g.add_edge(prev, f, 0, "activation")
        prev = f
    g.add_edge(prev, "loss", 0, "activation")
    g.add_edge("Y", "loss", 0, "label")
    # backward chain
    prev = "loss"
    for l in reversed(range(num_layers)):
        _, _, b, _ = node_names(l)
        g.add_edge(prev, b, 0, "grad_input")
        prev = b
    # per-layer weight loop
    for l in range(num_layers):
        w, f, b, u = node_names(l)
        g.add_edge(f, b, 0, "saved")
        g.add_edge(w, f, 0, "weight")
        g.add_edge(w, b, 0, "weight")
        g.add_edge(w, u, 0, "weight")
        g.add_edge(b, u, int(gradient_delays[l]), "gradient")
        g.add_edge(u, w, 1, "register")
    return g
