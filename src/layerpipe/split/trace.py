"""Capture a model as one `torch.fx` graph whose parameters are the model's own tensors.

Two tracers, tried in this order by `trace_model(method="auto")`:

- `torch.fx.symbolic_trace` (method "fx"): a torch-level graph of the model's own code, with
  built-in `torch.nn` layers kept as single `call_module` nodes. Shapes, devices and dtypes
  stay symbolic and `train()` / `eval()` keep working on those layers. Fails on Python
  control flow that depends on tensor values or shapes and on `**kwargs` forwards (which is
  the case for every Hugging Face model since transformers 5, where `transformers.utils.fx`
  no longer exists).
- `torch.export.export(strict=False)` (method "export"): runs the model's Python code on
  fake tensors, so shape-dependent control flow is fine; produces an ATen-level graph. The
  graph is specialised to the example's devices, dtypes and training mode (dropout on or
  off is frozen at split time); input shapes are exported with `Dim.AUTO` where the model
  allows, so other batch sizes and sequence lengths keep working. `ExportedProgram.module()`
  re-attaches the model's own parameters and buffers (no copies), which is checked.

Either way the result is a `TracedModel`: a `GraphModule` whose placeholders are the
model's inputs flattened in a fixed order, plus the functions that flatten a user call
`(args, kwargs)` into those placeholders and rebuild the model's output from the graph's.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

from layerpipe.errors import PlanError

METHODS = ("auto", "fx", "export")

# argument values baked into the fx graph as constants instead of becoming inputs
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class ValueInfo:
    """What one graph value was in the example forward."""

    is_tensor: bool
    has_tensor: bool  # a tensor, or a container holding at least one
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    requires_grad: bool = False


@dataclass
class TracedModel:
    """A model's forward as one graph, and how to call it like the model."""

    gm: fx.GraphModule
    method: str  # "fx" or "export"
    flatten_inputs: Callable[[tuple, dict], list[Any]]
    unflatten_output: Callable[[Any], Any]
    #: per node, the value it had in the example forward (empty without example inputs)
    values: dict[fx.Node, ValueInfo] = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# -- torch.fx ---------------------------------------------------------------------------------
def _trace_fx(model: nn.Module, args: tuple, kwargs: dict) -> TracedModel:
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise PlanError(f"{type(model).__name__}.forward takes *args or **kwargs, which torch.fx cannot trace")
    concrete: dict[str, Any] | None = None
    if args or kwargs:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise PlanError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from None
        concrete = {}
        for p in params:
            if p.name in bound.arguments:
                value = bound.arguments[p.name]
                if isinstance(value, _CONSTANT_TYPES):
                    concrete[p.name] = value  # flags such as use_cache=False: baked in
            elif p.default is not p.empty:
                concrete[p.name] = p.default
    gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(params):
        raise PlanError(f"fx traced {len(placeholders)} inputs for the {len(params)} arguments of forward")

    def flatten_inputs(a: tuple, kw: dict) -> list[Any]:
        try:
            b = sig.bind(*a, **kw)
        except TypeError as exc:
            raise TypeError(f"stage 0 takes the model's arguments: {exc}") from None
        b.apply_defaults()
        return [b.arguments[p.name] for p in params]

    return TracedModel(gm, "fx", flatten_inputs, lambda out: out)


# -- torch.export -----------------------------------------------------------------------------
def _auto_dims(tree: Any) -> Any:
    from torch.export import Dim

    return pytree.tree_map(
        lambda v: {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, Tensor) and v.dim() else None, tree
    )


def _trace_export(model: nn.Module, args: tuple, kwargs: dict) -> TracedModel:
    import torch.fx._pytree as fx_pytree

    if not args and not kwargs:
        raise PlanError("torch.export needs example inputs: pass example_args / example_kwargs")
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        dynamic = {name: _auto_dims(value) for name, value in bound.arguments.items()}
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    except Exception:  # noqa: BLE001 - some models only export with static shapes
        ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module()
    in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    copied = [n for n, p in gm.named_parameters() if id(p) not in own]
    if copied:
        raise PlanError(f"torch.export copied parameters instead of sharing them: {', '.join(copied[:3])}")

    def flatten_inputs(a: tuple, kw: dict) -> list[Any]:
        try:
            return list(fx_pytree.tree_flatten_spec((tuple(a), dict(kw)), in_spec))
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"stage 0 must be called with the structure of the example inputs ({in_spec}): {exc}") from None

    def unflatten_output(out: Any) -> Any:
        return pytree.tree_unflatten(list(out), out_spec)

    return TracedModel(gm, "export", flatten_inputs, unflatten_output)


# -- the example forward --------------------------------------------------------------------------
def _info(value: Any) -> ValueInfo:
    if isinstance(value, Tensor):
        return ValueInfo(True, True, tuple(value.shape), value.dtype, value.requires_grad)
    leaves = pytree.tree_leaves(value) if isinstance(value, (tuple, list, dict)) else []
    return ValueInfo(False, any(isinstance(v, Tensor) for v in leaves))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, ValueInfo]) -> None:
        super().__init__(gm)
        self._values = values

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self._values[n] = _info(out)
        return out


def record_values(model: nn.Module, traced: TracedModel, args: tuple, kwargs: dict) -> None:
    """Run the graph once on the example inputs and note what every value is. The model's
    buffers (BatchNorm statistics) and the random number generators are left unchanged."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            _Recorder(traced.gm, traced.values).run(*traced.flatten_inputs(args, kwargs))
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)


def trace_model(model: nn.Module, args: tuple = (), kwargs: dict | None = None, method: str = "auto") -> TracedModel:
    """Trace `model` (see the module docstring); every failure is one `PlanError`."""
    kwargs = dict(kwargs or {})
    if method not in METHODS:
        raise PlanError(f"unknown trace method {method!r}; choose one of: {', '.join(METHODS)}")
    name = type(model).__name__
    reasons = []
    traced = None
    for m in ("fx", "export") if method == "auto" else (method,):
        try:
            traced = (_trace_fx if m == "fx" else _trace_export)(model, args, kwargs)
        except PlanError as exc:
            reasons.append(f"{m}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - tracers raise anything; the user gets one line
            reasons.append(f"{m}: {_first_line(exc)}")
            continue
        if not (args or kwargs):
            break
        try:
            record_values(model, traced, args, kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - e.g. fx baked a branch the example does not take
            reasons.append(f"{m}: the traced graph fails on the example inputs ({_first_line(exc)})")
            traced = None
    if traced is None:
        raise PlanError(f"cannot capture {name} as a graph ({'; '.join(reasons)})")
    return traced
