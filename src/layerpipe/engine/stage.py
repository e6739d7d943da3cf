"""One pipeline stage: its layers, optimizer and weight strategy; forward, backward, update.

Both engines drive stages through this class: the single-process engine holds all of them,
the distributed runtime one per process.

Past weights reach the backward pass without swapping parameters in place (autograd's
version check forbids that, and it is what broke PipeDream on later PyTorch): the forward
runs on the live parameters inside `torch.autograd.graph.saved_tensors_hooks`; when an
operation saves a parameter (or a view of one, such as `weight.t()`), the pack hook stores
only a reference to it, and the unpack hook, called during the backward, hands autograd the
same view of the tensor the weight strategy chose (the stashed version, the EMA
reconstruction, or the live weights). Activations are saved as usual. The weight gradient
itself needs no weights, so it always lands in `param.grad` for the optimizer.

Two other forms a weight takes before autograd saves it are handled the same way:
- a dtype cast under `torch.autocast` (a copy whose autograd parent is the parameter): the
  pack hook keeps a reference and the dtype; the backward gets the chosen version, cast as
  the forward cast it;
- a recompute under activation checkpointing (`torch.utils.checkpoint`): the recompute runs
  during the backward and reads the parameters themselves, so for the length of a backward
  whose weights differ from the live ones the parameters' `.data` point at the chosen
  version (nothing is modified in place; the optimizer never sees it).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import functools

import torch
from torch import Tensor, nn

from layerpipe.errors import TrainingDiverged
from layerpipe.compensate import attach_stage, build_optimizer, history_bytes
from layerpipe.plan import PipelineSpec
from layerpipe.weights import WeightStrategy, make_strategy

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class _ParamRef:
    """What the pack hook keeps instead of a saved parameter: which one, which view, and the
    dtype autocast cast it to (None: not cast)."""

    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the parameter's own (or its cast copy's)
    dtype: torch.dtype | None = None


@dataclass
class InFlight:
    """A microbatch between its forward and its backward on one stage."""

    inputs: Tensor  # leaf; its .grad is what the previous stage receives
    output: Tensor  # the stage output (the loss on the last stage)
    version: int  # weight version its forward used


class Stage:
    """Runs one stage's forward, backward and optimizer step for the tick engine."""

    def __init__(
        self,
        index: int,
        module: nn.Module,
        delay: int,
        strategy_factory: Callable[[list[Tensor], int, torch.optim.Optimizer | None], WeightStrategy],
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
        *,
        is_last: bool,
        loss_fn: LossFn | None = None,
    ) -> None:
        self.index = index
        self.module = module
        self.delay = delay
        self.is_first = index == 0
        self.is_last = is_last
        self.loss_fn = loss_fn
        self.params = [p for p in module.parameters() if p.requires_grad]
        # a stage without parameters (say, a lone activation) has nothing to update
        self.optimizer = optimizer_factory(self.params) if (self.params and optimizer_factory) else None
        self.strategy = strategy_factory(self.params, delay, self.optimizer)
        self.inflight: dict[int, InFlight] = {}
        self._storage_index = {p.untyped_storage().data_ptr(): i for i, p in enumerate(self.params)}
        self._param_index = {id(p): i for i, p in enumerate(self.params)}
        self._backward_weights: list[Tensor] | None = None
        # set by a compensation (layerpipe.compensate.predict): the forward runs on predicted
        # weights inside this context; saved parameters still resolve to backward_weights
        self.forward_context: Callable[[], AbstractContextManager[Any]] | None = None

    # -- saved-tensor hooks -----------------------------------------------------------------
    def _pack(self, t: Tensor) -> Any:
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        i = self._storage_index.get(t.untyped_storage().data_ptr())
        if i is not None:
            return _ParamRef(i, t.size(), t.stride(), t.storage_offset() - self.params[i].storage_offset())
        # autocast's copy of a parameter (or a view of one): its grad_fn is the cast, and
        # the cast's only input is the parameter's gradient accumulator
        base = t._base if t._base is not None else t
        fn = base.grad_fn
        if fn is not None and type(fn).__name__ == "ToCopyBackward0":
            source = fn.next_functions[0][0]
            i = self._param_index.get(id(getattr(source, "variable", None)))
            if i is not None and base.shape == self.params[i].shape:
                return _ParamRef(i, t.size(), t.stride(), t.storage_offset() - base.storage_offset(), base.dtype)
        return t

    def _unpack(self, packed: Any) -> Tensor:
        if not isinstance(packed, _ParamRef):
            return packed
        if self._backward_weights is None:
            raise RuntimeError("a saved parameter was read outside this stage's backward")
        w = self._backward_weights[packed.index]
        if packed.dtype is not None and packed.dtype != w.dtype:
            w = w.to(packed.dtype)  # the forward's autocast cast, repeated on the chosen version
        if packed.offset == 0 and w.size() == packed.size and w.stride() == packed.stride:
            return w
        return w.as_strided(packed.size, packed.stride, w.storage_offset() + packed.offset)

    # -- the three actions of a tick --------------------------------------------------------
    def forward(self, mb: int, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Forward of microbatch `mb` on the current weights. Returns the activation for the
        next stage (detached) or, on the last stage, the detached loss."""
        inputs = x.detach()
        if not self.is_first and inputs.is_floating_point():
            inputs.requires_grad_(True)
        version = self.strategy.record_forward()
        predicted = self.forward_context() if self.forward_context is not None else nullcontext()
        with predicted, torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = self.module(inputs)
            if self.is_last:
                assert self.loss_fn is not None and target is not None
                out = self.loss_fn(out, target)
        if self.is_last and not torch.isfinite(out.detach()).all():  # host sync on GPU
            raise TrainingDiverged(f"the loss of microbatch {mb} is {out.item()} (stage {self.index}); training stopped")
        self.inflight[mb] = InFlight(inputs, out, version)
        return out.detach()

    def backward(self, mb: int, grad_output: Tensor | None = None) -> Tensor | None:
        """Backward of microbatch `mb` with the weights the strategy gives. Leaves the weight
        gradient in `param.grad`; returns the gradient for the previous stage's output."""
        item = self.inflight.pop(mb)
        for p in self.params:
            p.grad = None
        weights = self._backward_weights = self.strategy.backward_weights(item.version)
        # a recompute (activation checkpointing) reads the parameters themselves: point them at
        # the chosen version while the backward runs; the live storage comes back after
        live = None if weights is self.strategy.params else [p.data for p in self.params]
        try:
            if live is not None:
                for p, w in zip(self.params, weights):
                    p.data = w
            if self.is_last:
                item.output.backward()
            elif item.output.requires_grad:
                item.output.backward(grad_output)
        finally:
            if live is not None:
                for p, w in zip(self.params, live):
                    p.data = w
            self._backward_weights = None
            self.strategy.release(item.version)
        return item.inputs.grad if item.inputs.requires_grad else None

    def update(self) -> None:
        """Apply the gradient of the last backward with the stage's optimizer."""
        self.strategy.before_update()
        if self.optimizer is not None:
            self.optimizer.step()
        self.strategy.after_update()
        for p in self.params:
            p.grad = None

    # -- reporting and checkpoints ----------------------------------------------------------
    def history_bytes(self) -> int:
        """Bytes held for past weights: the strategy's and any delay compensation's."""
        return self.strategy.history_bytes() + history_bytes(self.optimizer)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def state_dict(self) -> dict[str, Any]:
        if self.inflight:
            raise RuntimeError("a stage can only be checkpointed with no microbatch in flight")
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "strategy": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])


def build_stages(
    modules: Sequence[nn.Module],
    spec: PipelineSpec,
    weights: str,
    optimizer: OptimizerFactory | None,
    loss_fn: LossFn,
    weight_options: Mapping[str, Any] | None = None,
    only: int | None = None,
    compensation: Sequence[Any] | None = None,
) -> list[Stage]:
    """One `Stage` per module (or only stage `only`), each with its optimizer and strategy.
    `compensation`: delay-compensation specs (`layerpipe.compensate`, e.g. ["predict"]) that
    build or wrap each stage's optimizer knowing the stage's delay."""
    options = dict(weight_options or {})
    last = spec.num_stages - 1
    stages = []
    for k in range(spec.num_stages):
        if only is not None and k != only:
            continue
        factory = optimizer
        if compensation:
            factory = functools.partial(build_optimizer, delay=spec.delays[k], specs=list(compensation), base=optimizer)
        stage = Stage(k, modules[k], spec.delays[k], lambda ps, d, opt: make_strategy(weights, ps, d, opt, **options),
                      factory, is_last=k == last, loss_fn=loss_fn)
        if compensation and stage.optimizer is not None:
            attach_stage(stage)
        stages.append(stage)
    return stages


def sequential_modules(model: nn.Sequential, spec: PipelineSpec) -> list[nn.Module]:
    """The stages of an nn.Sequential as slices (sharing the model's layers)."""
    return [model[a:b] for a, b in spec.bounds()]
