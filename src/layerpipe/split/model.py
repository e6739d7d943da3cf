"""`split_model` and the `SplitModel` it returns: stage modules, boundaries, shared weights.

Calling convention (what an engine relies on):

- `stages[0](*args, **kwargs)` takes the model's own arguments, exactly as `model(...)`.
- `stages[k](*values)` for k > 0 takes the values of boundary k-1 as positional tensors.
- Every stage but the last returns a tuple with the values of its boundary, in the order of
  `boundaries[k].names`; the last stage returns exactly what the model returns (a tensor, a
  tuple, a Hugging Face `ModelOutput`...), which is what a loss function receives.

So `out = stages[0](*args, **kwargs)`, then `out = stages[k](*out)` for k = 1.. gives
`model(*args, **kwargs)`; `SplitModel.__call__` does just that.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from layerpipe.errors import PlanError
from layerpipe.split.partition import StagePlan, auto_split_points, build_stage_graphs, cuts_from_split_points, plan_stages
from layerpipe.split.trace import TracedModel, trace_model


@dataclass(frozen=True)
class ValueSpec:
    """One value crossing a boundary, as seen in an example forward."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool  # whether a gradient flows back across the boundary for it
    batched: bool  # whether dim 0 is the batch dimension (its size was the example's batch size)

    @property
    def per_sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.batched else self.shape


@dataclass(frozen=True)
class Boundary:
    """The values stage `index` sends to stage `index + 1`."""

    index: int
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


class StageModule(nn.Module):
    """One stage: a `GraphModule` over the model's own submodules and tensors, called with
    the convention in the module docstring."""

    def __init__(self, index: int, num_stages: int, graph_module: fx.GraphModule, traced: TracedModel, num_inputs: int) -> None:
        super().__init__()
        self.index = index
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.graph_module = graph_module
        self.num_inputs = num_inputs
        self._flatten = traced.flatten_inputs
        self._unflatten = traced.unflatten_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_first:
            flat = self._flatten(args, kwargs)
        else:
            if kwargs or len(args) != self.num_inputs:
                raise TypeError(f"stage {self.index} takes the {self.num_inputs} values of boundary {self.index - 1} positionally")
            flat = list(args)
        out = self.graph_module(*flat)
        return self._unflatten(out) if self.is_last else tuple(out)


class SplitModel:
    """A model cut into pipeline stages that share its parameters and buffers.

    Attributes:
        model: the original model (trained in place through the stages).
        stages: the stage modules, in pipeline order.
        boundaries: `boundaries[k]` names the values stage k sends to stage k+1.
        split_points: the submodule name where each stage after the first begins.
        param_users: canonical parameter name (first name in `model.named_parameters()`)
            -> sorted stages whose forward reads that parameter.
        buffer_users: the same for buffers.
        method: the tracer that captured the graph, "fx" or "export".
        boundary_specs: shapes and dtypes of every boundary value in the example forward
            (None when no example inputs were given; see `describe_boundaries`).
    """

    def __init__(self, model: nn.Module, traced: TracedModel, plan: StagePlan, split_points: list[str]) -> None:
        self.model = model
        self.method = traced.method
        self.split_points = split_points
        graphs = build_stage_graphs(traced, plan)
        num = len(graphs)
        self.stages: list[StageModule] = [
            StageModule(k, num, g, traced, 0 if k == 0 else len(plan.boundaries[k - 1])) for k, g in enumerate(graphs)
        ]
        self.boundaries = [Boundary(k, tuple(v.name for v in vs)) for k, vs in enumerate(plan.boundaries)]
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._buffer_names = {id(b): n for n, b in model.named_buffers()}
        self.param_users = self._users(self._param_names, lambda m: m.parameters())
        self.buffer_users = self._users(self._buffer_names, lambda m: m.buffers())
        self.boundary_specs: list[list[ValueSpec]] | None = None

    def _users(self, names: dict[int, str], tensors: Any) -> dict[str, list[int]]:
        users: dict[str, list[int]] = {}
        for k, stage in enumerate(self.stages):
            for t in tensors(stage):
                name = names.get(id(t))
                if name is None:
                    raise PlanError(f"stage {k} holds a tensor that is not the model's own (a copy)")
                users.setdefault(name, []).append(k)
        return {n: users[n] for n in sorted(users, key=list(names.values()).index)}

    # -- structure --------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def owner(self, name: str) -> int:
        """The stage that owns parameter `name` (its first user): it keeps the optimizer
        state and applies the summed gradient of all users."""
        return self.param_users[name][0]

    def tied_params(self) -> dict[str, list[int]]:
        """Parameters read by more than one stage -> those stages."""
        return {n: ks for n, ks in self.param_users.items() if len(ks) > 1}

    def stage_parameters(self, k: int) -> list[tuple[str, nn.Parameter]]:
        """(canonical name, parameter) for every parameter stage k reads, tied ones included."""
        return [(self._param_names[id(p)], p) for p in self.stages[k].parameters()]

    def owned_parameters(self, k: int) -> list[tuple[str, nn.Parameter]]:
        """The parameters whose owner is stage k (give these to stage k's optimizer)."""
        return [(n, p) for n, p in self.stage_parameters(k) if self.owner(n) == k]

    # -- running ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The stages run in order without cutting the autograd graph: equals `model(...)`."""
        out = self.stages[0](*args, **kwargs)
        for stage in self.stages[1:]:
            out = stage(*out)
        return out

    def describe_boundaries(self, *args: Any, batch_size: int | None = None, **kwargs: Any) -> list[list[ValueSpec]]:
        """Shapes, dtypes and gradient needs of every boundary value from one forward on
        example inputs (buffers and random state are restored afterwards). `batch_size`
        defaults to dim 0 of the first tensor input; a value is `batched` when its dim 0 has
        that size (pick an example batch size no other dimension has)."""
        if batch_size is None:
            first = next((t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim()), None)
            batch_size = int(first.shape[0]) if first is not None else -1
        saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        specs: list[list[ValueSpec]] = []
        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            try:
                out = self.stages[0](*args, **kwargs)
                for k, stage in enumerate(self.stages[1:]):
                    specs.append([_spec(n, v, batch_size) for n, v in zip(self.boundaries[k].names, out)])
                    out = stage(*out)
            finally:
                with torch.no_grad():
                    for b, copy in saved:
                        b.copy_(copy)
        return specs

    def __repr__(self) -> str:
        sizes = ", ".join(str(len(b)) for b in self.boundaries)
        return f"SplitModel({type(self.model).__name__}, {self.num_stages} stages at {self.split_points}, boundary sizes [{sizes}], {self.method})"


def _spec(name: str, v: Any, batch_size: int) -> ValueSpec:
    if not isinstance(v, Tensor):
        raise PlanError(f"boundary value {name} is a {type(v).__name__}, not a tensor")
    return ValueSpec(name, tuple(v.shape), v.dtype, v.requires_grad, v.dim() > 0 and v.shape[0] == batch_size)


def split_model(
    model: nn.Module,
    *,
    split_points: Sequence[str] | None = None,
    num_stages: int | None = None,
    example_args: tuple = (),
    example_kwargs: dict | None = None,
    method: str = "auto",
) -> SplitModel:
    """Cut `model` into pipeline stages that share its parameters.

    Args:
        model: any module `torch.fx.symbolic_trace` or `torch.export` can capture.
        split_points: qualified submodule names where a new stage begins (the stage starts
            with the first operation run inside that submodule), e.g. ["transformer.h.2"].
        num_stages: instead of split points: K stages balanced by parameter count.
        example_args, example_kwargs: one example call `model(*args, **kwargs)`. Needed for
            `torch.export` and for `boundary_specs`; non-tensor arguments (flags such as
            `use_cache=False`) are fixed at these values.
        method: "auto" (fx, then export), "fx" or "export".

    Every reason the model cannot be split ends in one `PlanError`.
    """
    if (split_points is None) == (num_stages is None):
        raise PlanError("give either split_points or num_stages")
    if isinstance(split_points, str):
        raise PlanError(f"split_points is a list of submodule names, got the string {split_points!r}")
    args = tuple(example_args)
    kwargs = dict(example_kwargs or {})
    traced = trace_model(model, args, kwargs, method)
    if num_stages is not None:
        names = auto_split_points(model, traced, num_stages)
    else:
        names = list(split_points or [])
    cuts = cuts_from_split_points(model, traced, names)
    names = [n for _, n in sorted(zip(cuts, names))]
    plan = plan_stages(traced, cuts)
    split = SplitModel(model, traced, plan, names)
    if args or kwargs:
        try:
            split.boundary_specs = split.describe_boundaries(*args, **kwargs)
        except PlanError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PlanError(f"the stages fail on the example inputs: {type(exc).__name__}: {exc}") from None
    return split
