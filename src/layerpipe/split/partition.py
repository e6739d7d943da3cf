"""Cut a traced graph into pipeline stages and work out what crosses each boundary.

A cut is a position in the graph's node order (which is the order the model runs its
operations): stage k runs the operations between cut k-1 and cut k. A split point names a
submodule; its cut is the first operation run inside that submodule. Any cut of a
topologically ordered graph is valid for dataflow; what each boundary must then carry is
every value made before it and used after it (a residual stream, an attention mask, an
input used by a late stage), passed on unchanged by the stages in between.

Values that are not tensors (sizes, dtypes, the shape symbols of `torch.export`) cannot be
sent between stages: the stage that needs one recomputes it from the tensors it has (which
are then passed on instead). Tuples of tensors (an LSTM's output) are unpacked in the stage
that made them.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from layerpipe.errors import PlanError
from layerpipe.plan.costs import param_costs
from layerpipe.plan.layers import module_layers
from layerpipe.plan.partition import balanced_partition
from layerpipe.split.trace import TracedModel

COMPUTE_OPS = ("call_function", "call_method", "call_module")

# how much worse (largest stage cost) automatic cuts at a coarser module level may be than
# the best cuts at the finest level and still be preferred: whole blocks make simpler
# boundaries
COARSE_SLACK = 1.25

_SYM_SIZE = torch.ops.aten.sym_size.int
_META_METHODS = {"size", "dim", "numel", "ndimension", "stride", "item", "tolist", "get_device", "element_size"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


@dataclass
class StagePlan:
    """Which graph nodes each stage runs and which values cross each boundary."""

    cuts: list[int]  # node positions where stages 1.. begin
    home: dict[fx.Node, int]  # the stage computing each value (placeholders: 0)
    local: list[list[fx.Node]]  # per stage, the nodes it runs, in graph order (clones included)
    boundaries: list[list[fx.Node]]  # per boundary k (stage k -> k+1), the values crossing, in graph order
    split_points: list[str] = field(default_factory=list)  # a module name for every cut, where known
    #: (stage, sym_size node) -> (tensor entering that stage, dim): the size is read from a
    #: tensor the stage receives anyway instead of sending the tensor it was read from
    substitutes: dict[tuple[int, fx.Node], tuple[fx.Node, int]] = field(default_factory=dict)


def module_starts(traced: TracedModel) -> tuple[dict[str, int], set[str]]:
    """Position of the first operation run inside every submodule, and the names of the
    submodules called as one operation (fx leaf modules)."""
    starts: dict[str, int] = {}
    leaves: set[str] = set()
    for i, n in enumerate(traced.gm.graph.nodes):
        if n.op not in COMPUTE_OPS:
            continue
        paths = [v[0] for v in (n.meta.get("nn_module_stack") or {}).values() if isinstance(v, tuple)]
        if n.op == "call_module":
            paths.append(str(n.target))
            leaves.add(str(n.target))
        for path in paths:
            parts = path.split(".")
            for j in range(1, len(parts) + 1):  # a module's ancestors start no later than it
                starts.setdefault(".".join(parts[:j]), i)
    starts.pop("", None)
    return starts, leaves


def _first_compute(traced: TracedModel) -> int:
    for i, n in enumerate(traced.gm.graph.nodes):
        if n.op in COMPUTE_OPS:
            return i
    raise PlanError("the traced model runs no operations")


def cuts_from_split_points(model: nn.Module, traced: TracedModel, names: list[str]) -> list[int]:
    """Graph positions of the named split points, checked."""
    starts, leaves = module_starts(traced)
    known = dict(model.named_modules())
    cuts = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise PlanError(f"split points are submodule names such as 'layers.2', got {name!r}")
        if name not in starts:
            parts = name.split(".")
            outer = next((".".join(parts[:j]) for j in range(1, len(parts)) if ".".join(parts[:j]) in leaves), None)
            if outer is not None:
                raise PlanError(f"split point {name!r} lies inside {outer!r}, which the trace runs as one operation; cut before {outer!r} or after it")
            if name not in known:
                near = sorted(n for n in known if n and (n.startswith(name.rsplit(".", 1)[0] + ".") or n in name))[:5]
                hint = f" (submodules nearby: {', '.join(near)})" if near else ""
                raise PlanError(f"split point {name!r}: {type(model).__name__} has no submodule of that name{hint}")
            raise PlanError(f"split point {name!r}: that submodule is never called in forward")
        cuts.append(starts[name])
    order = sorted(range(len(cuts)), key=lambda i: cuts[i])
    first = _first_compute(traced)
    for a, b in zip([None, *order], order):
        if cuts[b] <= first and a is None:
            raise PlanError(f"split point {names[b]!r} begins with the model's first operation: stage 0 would be empty")
        if a is not None and cuts[a] == cuts[b]:
            raise PlanError(f"split points {names[a]!r} and {names[b]!r} begin at the same operation: a stage would be empty")
    return sorted(cuts)


def _node_costs(model: nn.Module, traced: TracedModel) -> list[float]:
    """Per node: trainable parameter elements it reads (a tied weight counts at each use)."""
    gm = traced.gm
    out = []
    for n in gm.graph.nodes:
        cost = 0.0
        if n.op == "call_module":
            cost = float(sum(p.numel() for p in gm.get_submodule(str(n.target)).parameters() if p.requires_grad))
        elif n.op in COMPUTE_OPS:
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    t = _get_attr(gm, str(a.target))
                    if isinstance(t, nn.Parameter) and t.requires_grad:
                        cost += t.numel()
        out.append(cost)
    return out


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def auto_split_points(model: nn.Module, traced: TracedModel, num_stages: int) -> list[str]:
    """Split point names for `num_stages` stages balanced by parameter count.

    An `nn.Sequential` is cut between its children exactly as `Pipeline` slices it. Other
    models are cut at the beginnings of submodules: the coarsest nesting depth whose best
    balance is within `COARSE_SLACK` of the best at the finest depth (so whole transformer
    blocks rather than half blocks when that costs little)."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise PlanError(f"num_stages must be a positive integer, got {num_stages!r}")
    if num_stages == 1:
        return []
    if isinstance(model, nn.Sequential):
        names = [name for name, _ in model.named_children()]
        if num_stages > len(names):
            raise PlanError(f"{num_stages} stages but the nn.Sequential has only {len(names)} layers")
        sizes = balanced_partition(param_costs(module_layers(model)), num_stages)
        return [names[sum(sizes[:k])] for k in range(1, num_stages)]
    starts, _ = module_starts(traced)
    first = _first_compute(traced)
    known = {name for name, _ in model.named_modules() if name}
    by_pos: dict[int, str] = {}  # position -> outermost module starting there
    for name in sorted(starts, key=lambda n: n.count(".")):
        if name in known and starts[name] > first:
            by_pos.setdefault(starts[name], name)
    costs = _node_costs(model, traced)
    max_depth = max((name.count(".") + 1 for name in by_pos.values()), default=0)
    best_at: list[tuple[float, list[int]]] = []
    for depth in range(1, max_depth + 1):
        cands = sorted(p for p, name in by_pos.items() if name.count(".") + 1 <= depth)
        segs = [first, *cands]
        if len(segs) < num_stages:
            continue
        seg_costs = [sum(costs[a:b]) for a, b in zip(segs, [*segs[1:], len(costs)])]
        if not any(seg_costs):
            seg_costs = [1.0] * len(segs)
        sizes = balanced_partition(seg_costs, num_stages)
        bounds = [sum(sizes[:k]) for k in range(num_stages + 1)]
        bottleneck = max(sum(seg_costs[bounds[k] : bounds[k + 1]]) for k in range(num_stages))
        best_at.append((bottleneck, [segs[bounds[k]] for k in range(1, num_stages)]))
    if not best_at:
        raise PlanError(
            f"{num_stages} stages but {type(model).__name__} has only {len(by_pos) + 1} places to cut "
            "(beginnings of submodules)"
        )
    finest = min(b for b, _ in best_at)
    _, cuts = next((b, c) for b, c in best_at if b <= finest * COARSE_SLACK)
    return [by_pos[c] for c in cuts]


# -- boundaries ---------------------------------------------------------------------------------
def _is_value(traced: TracedModel, n: fx.Node) -> bool:
    """Whether node n's value is (or may be) a tensor that can cross a boundary."""
    info = traced.values.get(n)
    if info is not None:
        return info.is_tensor
    # no example forward: recognise the usual metadata operations
    if n.op == "call_method" and n.target in _META_METHODS:
        return False
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _META_ATTRS:
        return False
    if n.op == "call_function" and (n.target is len or "sym_" in getattr(n.target, "__name__", "")):
        return False
    if n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "operator"):
        ins = n.all_input_nodes
        return bool(ins) and any(_is_value(traced, a) for a in ins)
    return True


def _is_tuple_of_tensors(traced: TracedModel, n: fx.Node) -> bool:
    info = traced.values.get(n)
    return info is not None and not info.is_tensor and info.has_tensor


def plan_stages(traced: TracedModel, cuts: list[int]) -> StagePlan:
    """Assign every node to a stage and find each boundary's values."""
    nodes = list(traced.gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last = len(cuts)
    home: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            home[n] = 0
        elif n.op in COMPUTE_OPS:
            home[n] = bisect.bisect_right(cuts, i)
            # unpack a tuple of tensors where it is made
            if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
                src = n.args[0]
                if _is_tuple_of_tensors(traced, src) and src in home:
                    home[n] = home[src]
    out_node = next(n for n in nodes if n.op == "output")

    local: list[set[fx.Node]] = [set() for _ in range(last + 1)]
    for n, k in home.items():
        if n.op != "placeholder":
            local[k].add(n)
    needed_from: dict[fx.Node, int] = {}  # value -> last stage that reads it from elsewhere
    deferred: list[tuple[int, fx.Node]] = []  # export's shape symbols, resolved at the end

    def need(k: int, v: fx.Node, chain: tuple[fx.Node, ...], defer: bool = True) -> None:
        if v.op == "get_attr" or home[v] == k or v in local[k]:
            return
        if defer and v.target is _SYM_SIZE and _symbol(v) is not None:
            deferred.append((k, v))
            return
        if not _is_value(traced, v):
            if _is_tuple_of_tensors(traced, v):
                raise PlanError(
                    f"a tuple of tensors ({v.name}) made in stage {home[v]} is used as a whole by stage {k}; "
                    "move the split point so that they are in the same stage"
                )
            if v.op == "placeholder":
                raise PlanError(f"the non-tensor input {v.name!r} is used by stage {k}; pass it as a tensor")
            local[k].add(v)  # recompute sizes and other metadata where they are used
            for a in v.all_input_nodes:
                need(k, a, (*chain, v))
            return
        needed_from[v] = max(needed_from.get(v, 0), k)

    for k in range(last + 1):
        for n in sorted(local[k], key=pos.__getitem__):
            for a in n.all_input_nodes:
                need(k, a, (n,))
    for a in out_node.all_input_nodes:
        need(last, a, (out_node,))
    substitutes: dict[tuple[int, fx.Node], tuple[fx.Node, int]] = {}
    for k, v in deferred:
        if v in local[k]:
            continue
        found = _same_size(v, [u for u, last_k in needed_from.items() if home[u] < k <= last_k])
        if found is None:
            need(k, v, (), defer=False)
        else:
            substitutes[(k, v)] = found
            local[k].add(v)

    boundaries: list[list[fx.Node]] = [[] for _ in range(last)]
    for v in sorted(needed_from, key=pos.__getitem__):
        for b in range(home[v], needed_from[v]):
            boundaries[b].append(v)
    ordered = [sorted(s, key=pos.__getitem__) for s in local]
    for k, ns in enumerate(ordered):
        if k and not ns:
            raise PlanError(f"stage {k} would run no operations")
    return StagePlan(cuts, home, ordered, boundaries, substitutes=substitutes)


def _symbol(v: fx.Node) -> Any:
    """The shape symbol a `sym_size` node of an exported graph reads, if it is a plain one."""
    val = v.meta.get("val")
    expr = getattr(getattr(val, "node", None), "expr", None)
    return expr if expr is not None and getattr(expr, "is_Symbol", False) else None


def _same_size(v: fx.Node, tensors: list[fx.Node]) -> tuple[fx.Node, int] | None:
    """A (tensor, dim) among `tensors` whose size is the symbol `v` reads."""
    want = _symbol(v)
    for u in tensors:
        shape = getattr(u.meta.get("val"), "shape", None) or ()
        for d, size in enumerate(shape):
            if getattr(getattr(size, "node", None), "expr", None) == want:
                return u, d
    return None


def build_stage_graphs(traced: TracedModel, plan: StagePlan) -> list[fx.GraphModule]:
    """One `GraphModule` per stage over the traced module's own submodules and tensors.

    Stage 0's placeholders are the traced graph's (the model's flattened inputs); stage k's
    are boundary k-1's values. Every stage but the last returns the tuple of boundary k's
    values; the last returns what the traced graph returns."""
    gm = traced.gm
    nodes = list(gm.graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    last = len(plan.local) - 1
    graphs = []
    for k, run in enumerate(plan.local):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k == 0:
            for n in nodes:
                if n.op == "placeholder":
                    env[n] = g.node_copy(n)
        else:
            for v in plan.boundaries[k - 1]:
                env[v] = g.placeholder(v.name)
        users = set(run) | ({out_node} if k == last else set())
        for n in nodes:  # parameters and buffers this stage reads, shared with the model
            if n.op == "get_attr" and any(u in users for u in n.users):
                env[n] = g.node_copy(n)
        for n in run:
            if (k, n) in plan.substitutes:
                u, d = plan.substitutes[(k, n)]
                env[n] = g.call_function(_SYM_SIZE, (env[u], d))
            else:
                env[n] = g.node_copy(n, lambda a: env[a])
        if k == last:
            g.output(fx.node.map_arg(out_node.args[0], lambda a: env[a]))
        else:
            g.output(tuple(env[v] for v in plan.boundaries[k]))
        g.lint()
        graphs.append(fx.GraphModule(gm, g, class_name=f"Stage{k}"))
    return graphs
