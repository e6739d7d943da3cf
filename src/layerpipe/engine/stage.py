"""One pipeline stage: its layers, optimizer and weight strategy; forward, backward, update.

Both engines drive stages through this class: the single-process engine holds all of them,
the distributed runtime one per process.

Past weights reach the backward pass without an in-place write to the parameters (autograd's
version check forbids that, and it is what broke PipeDream on later PyTorch), in one of two
ways. Through saved-tensor hooks: the forward runs on the live parameters inside
`torch.autograd.graph.saved_tensors_hooks`; when an operation saves a parameter (or a view
of one, such as `weight.t()`), the pack hook stores only a reference to it, and the unpack
hook, called during the backward, hands autograd the same view of the tensor the weight
strategy chose (the stashed version, the EMA reconstruction, or the live weights).
Activations are saved as usual. The weight gradient itself needs no weights, so it always
lands in `param.grad` for the optimizer.

A strategy whose backward reads the live weights (`latest`) needs none of this: its stage
runs the forward without hooks and sets its parameters' autograd version counters back after
each optimizer step, so autograd accepts the updated live weights in the later backward.

By storage swap, where torch can swap two storages' memory (`UntypedStorage._swap_data_ptr_`)
and every parameter of a stage owns its storage: the stage skips the hooks, whatever its strategy
(they cost a Python call per saved tensor at pack and at unpack). Its updates are hidden
from autograd as above, and for the backward the storage of each parameter is swapped, in
O(1) and without a copy, with that of the tensor the strategy gives (a stashed version, the
EMA reconstruction), so what autograd saved, views included, reads that version; the swap is
undone after the backward. The checks that keep the swap memory-safe (dtype, shape, a storage
of its own) run once per buffer a strategy keeps (`BufferViews`), not per backward. Not with autocast (the cast copy holds the forward's weights), tied
parameters or a compensation's forward context: those keep the hooks.

Two other forms a weight takes before autograd saves it are handled the same way:
- a dtype cast under `torch.autocast` (a copy whose autograd parent is the parameter): the
  pack hook keeps a reference and the dtype; the backward gets the chosen version, cast as
  the forward cast it;
- a recompute under activation checkpointing (`torch.utils.checkpoint`): the recompute runs
  during the backward and reads the parameters themselves, so for the length of a backward
  whose weights differ from the live ones the parameters' `.data` point at the chosen
  version (nothing is modified in place; the optimizer never sees it).

A stage's input and output may be one tensor (an nn.Sequential's slice: the fast path) or
several (a model cut by `layerpipe.split`): stage 0 takes the model's own call (a tensor, a
tuple of positional arguments or a dict of keyword arguments), stage k > 0 the tuple its
predecessor returned. Each floating-point input becomes a leaf that requires a gradient
(integer and boolean ones stay as they are); the backward returns one gradient per input
(None where there is none).

Tied parameters (one `nn.Parameter` read by several stages, such as tied embeddings): the
first stage that reads it owns it (its optimizer, its weight strategy, its update); a later
stage reading it records its forwards with the owner's strategy and takes that parameter's
version for its backward from there (`link_tied`), and hands its part of the gradient of
microbatch m to a shared `TiedGrads`, which the owner adds to its own in its backward of m
(always later in the tick order: the owner comes first in the pipeline), so each tied
parameter gets one update per microbatch from the sum of all its users' gradients.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from layerpipe.compensate import history_bytes, steps_now, update_period
from layerpipe.engine.fused import fused_update_for
from layerpipe.engine.saved import (STRIDED, ParamRef, TiedGrads, owns_storage, same_tensor, set_versions,
                                    storage_spans, swap_storages)
from layerpipe.errors import LayerpipeError, PlanError, TrainingDiverged
from layerpipe.plan.delays import delay_in_updates
from layerpipe.weights import BufferViews, WeightStrategy

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
#: called once per stage with its optimizer; the scheduler is stepped after every update
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class InFlight:
    """A microbatch between its forward and its backward on one stage."""

    inputs: Any  # leaf tensor, or tuple of inputs (leaves where floating); their .grad goes back
    output: Any  # the stage output, a tensor or a tuple (the loss on the last stage)
    version: int  # weight version its forward used
    foreign_versions: tuple[int, ...] = ()  # versions of the owners of its tied parameters
    hooked: bool = True  # its forward ran under the saved-tensor hooks




def _leaf(v: Any) -> Any:
    if not isinstance(v, Tensor):
        return v
    leaf = v.detach()
    if leaf.is_floating_point() or leaf.is_complex():
        leaf.requires_grad_(True)
    return leaf


def _detach(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(o.detach() if isinstance(o, Tensor) else o for o in out)
    raise PlanError(f"a stage other than the last must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _run_backward(out: Any, grad_output: Any, is_last: bool) -> None:
    """Backpropagate from a stage's output(s): the loss, one tensor, or the tensors of a tuple
    that require a gradient and received one."""
    if is_last:
        out.backward()
    elif isinstance(out, Tensor):
        if out.requires_grad:
            out.backward(grad_output)
    else:
        grads = grad_output if grad_output is not None else ()
        pairs = [(o, g) for o, g in zip(out, grads) if g is not None and isinstance(o, Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


class Stage:
    """Runs one stage's forward, backward and optimizer step for the tick engine.

    Optional controls: `owned` (the parameters this stage updates; default: all it reads),
    `autocast` ((device type, dtype): each forward and the loss run under `torch.autocast`),
    `clip_grad_norm` (clip the stage's gradient to this norm before each step),
    `lr_scheduler` (factory called with the stage's optimizer; stepped after every update) and
    `fused_update` (the strategy's passes and the optimizer step in one compiled loop per tensor:
    `engine.fused`).
    """

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
        owned: Sequence[nn.Parameter] | None = None,
        autocast: tuple[str, torch.dtype] | None = None,
        clip_grad_norm: float | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        fused_update: bool = False,
    ) -> None:
        self.index = index
        self.module = module
        self.delay = delay
        self.is_first = index == 0
        self.is_last = is_last
        self.loss_fn = loss_fn
        read = [p for p in module.parameters() if p.requires_grad]
        #: the parameters this stage updates (its optimizer's and strategy's)
        self.owned = read if owned is None else list(owned)
        #: every parameter its forward reads: the owned ones, then tied ones owned elsewhere
        self.params = list(self.owned)
        # a stage without parameters (say, a lone activation) has nothing to update
        self.optimizer = optimizer_factory(self.owned) if (self.owned and optimizer_factory) else None
        #: ticks per weight update (A where gradients are accumulated): the strategy counts
        #: versions in updates, so its delay is ceil(d_k / A) of them
        self.update_period = update_period(self.optimizer)
        self.strategy = strategy_factory(self.owned, delay_in_updates(delay, self.update_period), self.optimizer)
        #: whether the last `update` changed the weights (the distributed runtime tells a tied
        #: parameter's other readers)
        self.stepped = False
        self.scheduler = lr_scheduler(self.optimizer) if (lr_scheduler and self.optimizer) else None
        self.clip_grad_norm = clip_grad_norm
        #: the update as one compiled loop (`engine.fused`); None: torch.optim's step between the
        #: strategy's hooks (also where fused_update leaves a small stage unfused)
        self.fused = fused_update_for(index, self.optimizer, self.strategy, self.owned) \
            if (fused_update and self.optimizer is not None) else None
        #: False: a compensation that accumulates keeps its own sum instead of the gradients
        #: (for a caller that touches `.grad` between ticks); see `can_keep_grads`
        self.may_keep_grads = True
        self._autocast = autocast
        self.inflight: dict[int, InFlight] = {}
        # tied parameters (see the module docstring): set by `link_tied`
        self._foreign: list[tuple[WeightStrategy, list[int]]] = []  # (owner's strategy, indices there)
        self._foreign_params: list[nn.Parameter] = []
        self._owned_tied: list[nn.Parameter] = []
        self._tied: TiedGrads | None = None
        self._backward_weights: list[Tensor] | None = None
        self._index_params()
        # set by a compensation (layerpipe.compensate.predict): the forward runs on predicted
        # weights inside this context; saved parameters still resolve to backward_weights
        self.forward_context: Callable[[], AbstractContextManager[Any]] | None = None

    def _index_params(self) -> None:
        self._span_starts, self._span_ends, self._span_index = storage_spans(self.params)
        self._param_index = {id(p): i for i, p in enumerate(self.params)}
        # a cast copy has another dtype than its parameter: tensors of the parameters' own
        # dtypes skip the (costlier) cast check in the pack hook
        self._param_dtypes = {p.dtype for p in self.params}
        # what the parameters point at again after a backward on another version (made once:
        # `p.data` makes a new tensor object per call)
        self._live_data = tuple(p.detach() for p in self.params)
        # their storages, for the swap of a backward without hooks (`_backward_swapped`)
        self._live_storages = tuple(p.untyped_storage() for p in self.params)
        # a backward on the live weights (`latest`) needs no reference per saved parameter,
        # only that autograd accept the optimizer's in-place update (not a cast copy: it holds
        # the forward's weights)
        live = (self.strategy.live_backward and all(s.live_backward for s, _ in self._foreign)
                and self._autocast is None)
        #: a backward on a past version swaps its storage into the parameters (module docstring)
        self.swaps = (bool(self.params) and not live and set_versions is not None and swap_storages is not None
                      and self.delay > 0 and self._autocast is None and not self._foreign and not self._owned_tied
                      and all(owns_storage(p) for p in self.params)
                      and len({p.untyped_storage().data_ptr() for p in self.params}) == len(self.params))
        #: the updates of this stage are hidden from autograd's version check (see `update`)
        self.hides_updates = (live or self.swaps) and set_versions is not None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(*((same_tensor, same_tensor) if live else (self._pack, self._unpack)))

    def _forward_hooks(self) -> AbstractContextManager[Any]:
        """The saved-tensor hooks of a forward: none where no update can come between it and
        its backward (delay 0, the last stage or sync) or where updates are hidden (`latest`;
        a compensation's forward context changes the weights in place, so not with one)."""
        if (self.delay == 0 and not self._foreign) or (self.hides_updates and self.forward_context is None):
            return nullcontext()
        return self._hooks

    def link_tied(self, owners: Mapping[int, Any], tied: TiedGrads, owned_tied: Sequence[nn.Parameter]) -> None:
        """Read the tied parameters owned by other stages (`owners`: id(param) -> owner stage,
        or any object with its `index`, `strategy` and `owned`, such as the distributed
        runtime's replica of a remote owner) through their owners' strategies; `owned_tied`:
        this stage's own tied parameters, whose other users' gradient parts it adds in its
        backward."""
        self._tied = tied
        self._owned_tied = list(owned_tied)
        groups: dict[int, tuple[Stage, list[nn.Parameter]]] = {}
        for p in (p for p in self.module.parameters() if p.requires_grad):
            owner = owners.get(id(p))
            if owner is None or owner is self:
                continue
            if owner.index >= self.index:
                raise PlanError(f"stage {self.index} reads a parameter owned by the later stage {owner.index}")
            groups.setdefault(owner.index, (owner, []))[1].append(p)
        self._foreign, self._foreign_params = [], []
        for owner, ps in groups.values():
            where = {id(q): i for i, q in enumerate(owner.owned)}
            self._foreign.append((owner.strategy, [where[id(p)] for p in ps]))
            self._foreign_params.extend(ps)
        self.params = list(self.owned) + self._foreign_params
        self._index_params()

    # -- saved-tensor hooks -----------------------------------------------------------------
    def _pack(self, t: Tensor) -> Any:
        if t.layout is not STRIDED:
            return t
        ptr = t.data_ptr()  # 0 on the meta device and for empty tensors: no parameter
        j = bisect_right(self._span_starts, ptr) - 1
        if ptr and j >= 0 and ptr < self._span_ends[j]:
            i = self._span_index[j]
            return ParamRef(i, t.size(), t.stride(), t.storage_offset() - self.params[i].storage_offset())
        if t.dtype in self._param_dtypes or not t.is_floating_point():
            return t
        # autocast's copy of a parameter (or a view of one): its grad_fn is the cast, and
        # the cast's only input is the parameter's gradient accumulator
        base = t._base if t._base is not None else t
        fn = base.grad_fn
        if fn is not None and type(fn).__name__ == "ToCopyBackward0":
            source = fn.next_functions[0][0]
            i = self._param_index.get(id(getattr(source, "variable", None)))
            if i is not None and base.shape == self.params[i].shape:
                return ParamRef(i, t.size(), t.stride(), t.storage_offset() - base.storage_offset(), base.dtype)
        return t

    def _unpack(self, packed: Any) -> Tensor:
        if type(packed) is not ParamRef:
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
    def forward(self, mb: int, x: Any, target: Any = None) -> Any:
        """Forward of microbatch `mb` on the current weights. `x` is a tensor, a tuple (the
        positional inputs) or, on the first stage, a dict (keyword inputs). Returns the
        activation(s) for the next stage (detached) or, on the last stage, the detached loss."""
        if isinstance(x, Tensor):  # the common case, kept lean
            inputs = x.detach()
            if not self.is_first and inputs.is_floating_point():
                inputs.requires_grad_(True)
            args: tuple = (inputs,)
            kwargs: dict = {}
        elif isinstance(x, tuple):
            inputs = args = x if self.is_first else tuple(_leaf(v) for v in x)
            kwargs = {}
        elif isinstance(x, Mapping) and self.is_first:
            inputs, args, kwargs = (), (), dict(x)
        else:
            raise LayerpipeError(f"stage {self.index} takes a tensor, a tuple of inputs or (stage 0) a dict of "
                                 f"keyword inputs, got {type(x).__name__}")
        version = self.strategy.record_forward()
        foreign = tuple(s.record_forward() for s, _ in self._foreign) if self._foreign else ()
        predicted = self.forward_context() if self.forward_context is not None else nullcontext()
        # hooks cost a Python call per saved tensor: none where autograd's own saving is exact
        hooks = self._forward_hooks()
        with predicted, hooks:
            if self._autocast is None:
                out = self._run(args, kwargs, target)
            else:
                with torch.autocast(self._autocast[0], dtype=self._autocast[1]):
                    out = self._run(args, kwargs, target)
        if self.is_last and not torch.isfinite(out.detach()).all():  # host sync on GPU
            raise TrainingDiverged(f"the loss of microbatch {mb} is {out.item()} (stage {self.index}); training stopped")
        self.inflight[mb] = InFlight(inputs, out, version, foreign, hooks is self._hooks)
        return _detach(out)

    def _run(self, args: tuple, kwargs: dict, target: Any) -> Any:
        out = self.module(*args, **kwargs) if kwargs else self.module(*args)
        if self.is_last:
            assert self.loss_fn is not None and target is not None
            out = self.loss_fn(out, target)
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise LayerpipeError("loss_fn(output, target) must return a scalar tensor, got "
                                     + (f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__))
        return out

    def backward(self, mb: int, grad_output: Any = None) -> Any:
        """Backward of microbatch `mb` with the weights the strategy gives. Leaves the weight
        gradient in `param.grad`; returns the gradient for the previous stage's output (a
        tuple, None where none, when the stage took a tuple)."""
        item = self.inflight.pop(mb)
        self._clear_grads()
        saved: list[Tensor | None] = []
        if self.swaps and not item.hooked:  # no hooks: the version's storage is swapped in
            self._backward_swapped(item, grad_output)
        else:
            saved = self._backward_hooked(item, grad_output)
        if self._foreign or self._owned_tied:
            self._exchange_tied(mb, saved)
        inputs = item.inputs
        if isinstance(inputs, Tensor):
            return inputs.grad if inputs.requires_grad else None
        if self.is_first:
            return None
        return tuple(v.grad if isinstance(v, Tensor) and v.requires_grad else None for v in inputs)

    def _backward_hooked(self, item: InFlight, grad_output: Any) -> list[Tensor | None]:
        """The backward of a forward that ran under the saved-tensor hooks: the unpack hook
        hands autograd the strategy's version. Returns the gradients of tied parameters owned
        elsewhere that were set aside (`_exchange_tied` puts them back)."""
        saved: list[Tensor | None] = []
        weights = self._backward_weights = self.strategy.backward_weights(item.version)
        differs = weights is not self.strategy.params
        if self._foreign:  # tied parameters owned elsewhere: their owners' versions
            weights = list(weights)
            for (strategy, where), v in zip(self._foreign, item.foreign_versions):
                ws = strategy.backward_weights(v)
                differs = differs or ws is not strategy.params
                weights.extend(ws[i] for i in where)
            self._backward_weights = weights
            # this stage's part of their gradient must not mix with (or wipe) another's
            saved = [p.grad for p in self._foreign_params]
            for p in self._foreign_params:
                p.grad = None
        # a recompute (activation checkpointing) reads the parameters themselves: point them at
        # the chosen version while the backward runs; the live storage comes back after
        live = self._live_data if differs else None
        try:
            if live is not None:
                for p, w in zip(self.params, weights):
                    p.data = w
            _run_backward(item.output, grad_output, self.is_last)
        finally:
            if live is not None:
                for p, w in zip(self.params, live):
                    p.data = w
            self._backward_weights = None
            self.strategy.release(item.version)
            for (strategy, _), v in zip(self._foreign, item.foreign_versions):
                strategy.release(v)
        return saved

    def _backward_swapped(self, item: InFlight, grad_output: Any) -> None:
        """The backward of a forward that ran without hooks: each parameter's storage is swapped
        with that of the tensor the strategy gives for it (O(1), no copy; autograd saved the
        parameters or views of them, which now read that version), and swapped back after.
        Version counters do not move: a swap is no in-place operation."""
        assert swap_storages is not None  # `swaps` needs it
        weights = self.strategy.backward_weights(item.version)
        pairs = [] if weights is self.strategy.params else self._swap_pairs(weights)
        for a, b in pairs:
            swap_storages(a, b)
        try:
            _run_backward(item.output, grad_output, self.is_last)
        finally:
            for a, b in pairs:
                swap_storages(a, b)
            self.strategy.release(item.version)

    def _swap_pairs(self, weights: list[Tensor]) -> list[tuple[Any, Any]]:
        """(live storage, version's storage) per parameter whose version is not the live
        weights, each checked to fill a storage like the live one (memory safety). A strategy's
        own buffer (`BufferViews`) keeps its checked pairs: the per-parameter checks run once
        per buffer, not once per backward."""
        if type(weights) is BufferViews and weights.checked_for is self._live_storages:
            return weights.swap_pairs
        pairs, copied = [], False
        for p, live, w in zip(self._live_data, self._live_storages, weights):
            theirs = w.untyped_storage()
            if theirs.data_ptr() == live.data_ptr():  # the live weights themselves
                continue
            if w.dtype != p.dtype or w.shape != p.shape:
                raise LayerpipeError(f"weight strategy {self.strategy.name!r} gave the backward a {w.dtype} "
                                     f"{tuple(w.shape)} tensor for a {p.dtype} {tuple(p.shape)} parameter")
            # the check that keeps memory safe: the version fills a storage like the live one
            if w.storage_offset() or theirs.nbytes() != live.nbytes() or theirs.device != live.device \
                    or not w.is_contiguous():
                theirs = torch.empty_like(p).copy_(w).untyped_storage()  # a view into a shared buffer
                copied = True
            pairs.append((live, theirs))
        if type(weights) is BufferViews and not copied:  # a copy is made afresh for each backward
            weights.checked_for, weights.swap_pairs = self._live_storages, pairs
        return pairs

    def _exchange_tied(self, mb: int, saved: list[Tensor | None]) -> None:
        """Park this stage's part of the gradient of tied parameters owned elsewhere (their
        owner adds it), and, as an owner, add the other users' parts of microbatch `mb`: one
        update from the summed gradient."""
        assert self._tied is not None
        for p, g in zip(self._foreign_params, saved):
            if p.grad is not None:
                self._tied.add(mb, p, p.grad)
            p.grad = g
        for p in self._owned_tied:
            part = self._tied.pop(mb, p)
            if part is not None:
                p.grad = part if p.grad is None else p.grad + part

    def update(self) -> None:
        """Apply the gradient of the last backward with the stage's optimizer (clipped first
        when `clip_grad_norm` is set; the learning-rate scheduler steps after)."""
        if self.clip_grad_norm is not None and self.owned:
            torch.nn.utils.clip_grad_norm_(self.owned, self.clip_grad_norm)
        self.stepped = stepping = steps_now(self.optimizer)
        if not (self.fused is not None and self._hidden(self.fused.step)):
            if stepping:
                self.strategy.before_update()
            if self.optimizer is not None:
                self._hidden(self.optimizer.step)
            if stepping:
                self.strategy.after_update()
            else:  # an accumulation's tick: the weights did not move
                self.strategy.skip_update()
        if self.scheduler is not None:
            self.scheduler.step()
        self._clear_grads()

    @property
    def can_keep_grads(self) -> bool:
        """Whether a compensation may sum gradients in `.grad` across ticks (`holds_grads`):
        not where each tick's gradient is clipped or exchanged with tied parameters' other
        users. (Data-parallel replicas may: they all-reduce the kept sum again each tick,
        weighted by shares that sum to 1, which adds the new gradients only.)"""
        return (self.may_keep_grads and self.clip_grad_norm is None and not self._foreign
                and not self._owned_tied)

    def _clear_grads(self) -> None:
        """Drop the gradients of the last backward, unless the optimizer sums the next into them."""
        if self.optimizer is not None and self.can_keep_grads:
            holds = getattr(self.optimizer, "holds_grads", None)
            if callable(holds) and holds():
                return
        for p in self.owned:
            p.grad = None

    def _hidden(self, step: Callable[[], Any]) -> Any:
        """`step()` (the optimizer's, or the fused update), where `hides_updates` with the
        version counters of the parameters this stage owns set back after it: a forward that
        ran before reads the live weights in its backward, as `latest` asks, without
        saved-tensor hooks (autograd's check would refuse otherwise)."""
        if not self.hides_updates:
            return step()
        params = tuple(self.owned)
        versions = tuple(p._version for p in params)
        try:
            return step()
        finally:
            set_versions(params, versions)

    # -- reporting and checkpoints ----------------------------------------------------------
    def history_bytes(self) -> int:
        """Bytes held for past weights: the strategy's and any delay compensation's."""
        return self.strategy.history_bytes() + history_bytes(self.optimizer)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.owned)

    def state_dict(self) -> dict[str, Any]:
        if self.inflight:
            raise RuntimeError("a stage can only be checkpointed with no microbatch in flight")
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "strategy": self.strategy.state_dict(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
