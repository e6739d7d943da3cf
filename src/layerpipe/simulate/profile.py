"""Measure per-stage costs of a real model with a short run (imports torch).

    >>> costs = profile_model("mlp", num_stages=2, batch=32)          # doctest: +SKIP
    >>> costs.forward, costs.update                                    # doctest: +SKIP

Each stage is the model's slice (the partition `layerpipe plan` gives: balanced by
parameter count), timed alone on one thread (the CPU stand-in for one device per stage),
median of `repeats` after `warmup`:

- F: the slice's forward on a microbatch (the previous slice's output);
- backward: the whole backward (weight gradients, and the input gradient except on stage 0);
  W = backward - (the input gradient alone, `torch.autograd.grad` w.r.t. the input); stage 0
  has no input gradient to send, so all of its backward counts as W;
- U: one optimizer step (SGD momentum 0.9 unless `optimizer` is given);
- transfer: a copy of the boundary activation in memory (a lower bound for a real link);
- bytes: weights and optimizer state from the tensors, activations from what autograd saves
  in the forward (parameters excluded), per microbatch.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from layerpipe.simulate.costs import StageCosts


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_slices(
    slices: Sequence[Any],
    sample: Any,
    optimizer: Callable[[list], Any] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = 1,
    meta: dict | None = None,
) -> StageCosts:
    """Costs of running `slices` (nn.Modules, in order) as pipeline stages on microbatch `sample`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if optimizer is None:
        def optimizer(params: list) -> Any:
            return torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    fwd, bwd, wgt, upd, transfer, wbytes, obytes, abytes = [], [], [], [], [], [], [], []
    x = sample
    for k, module in enumerate(slices):
        costs, out = _profile_slice(module, x, k > 0, optimizer, repeats, warmup)
        for column, value in zip((fwd, bwd, wgt, upd, wbytes, obytes, abytes), costs):
            column.append(value)
        x = out.detach()
        if k < len(slices) - 1:
            transfer.append(_median_time(lambda: x.clone(), repeats, warmup))
    return StageCosts.make(
        len(slices), forward=fwd, backward=bwd, weight_grad=wgt, update=upd, transfer=transfer,
        weight_bytes=wbytes, optimizer_bytes=obytes, activation_bytes=abytes, meta=dict(meta or {}),
    )


def _profile_slice(module: Any, x: Any, needs_input_grad: bool, optimizer: Callable[[list], Any], repeats: int,
                   warmup: int) -> tuple[tuple, Any]:
    """(forward, backward, weight-gradient part, update seconds; weight, optimizer-state and
    saved-activation bytes) of one stage on input `x`, and its output."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    opt = optimizer(params) if params else None
    floating = torch.is_floating_point(x)
    inp = x.detach().requires_grad_(needs_input_grad and floating)

    def forward() -> Any:
        return module(inp)

    f = _median_time(forward, repeats, warmup)
    out = forward()
    grad = torch.randn_like(out) if torch.is_floating_point(out) else None

    def backward() -> None:
        o = module(inp)
        t0 = time.perf_counter()
        o.backward(grad)
        backward.elapsed = time.perf_counter() - t0  # type: ignore[attr-defined]

    def timed(fn: Callable[[], None]) -> float:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            fn()
            ts.append(fn.elapsed)  # type: ignore[attr-defined]
        return statistics.median(ts)

    b_all = timed(backward)
    if inp.requires_grad:
        def input_grad() -> None:
            o = module(inp)
            t0 = time.perf_counter()
            torch.autograd.grad(o, [inp], grad)
            input_grad.elapsed = time.perf_counter() - t0  # type: ignore[attr-defined]

        b_in = min(timed(input_grad), b_all)
    else:
        b_in = 0.0
    if opt is not None:
        backward()  # gradients present, as in training
        u = _median_time(opt.step, repeats, warmup)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    else:
        u, state = 0.0, 0
    module.zero_grad(set_to_none=True)
    # activation bytes: what autograd keeps for the backward, parameters excluded
    param_ptrs = {p.data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Any) -> Any:
        if t.data_ptr() not in param_ptrs:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(inp)
    weights = sum(p.numel() * p.element_size() for p in params)
    return (f, b_all, b_all - b_in, u, weights, state, sum(saved.values())), out


def profile_model(name: str, num_stages: int, batch: int = 32, repeats: int = 5, warmup: int = 2) -> StageCosts:
    """Build zoo model `name`, split it into `num_stages` stages balanced by parameters, and
    measure each stage on a microbatch of `batch` samples."""
    import torch

    from layerpipe.models import build_model, example_input
    from layerpipe.plan.costs import param_costs
    from layerpipe.plan.layers import module_layers
    from layerpipe.plan.partition import resolve_partition

    torch.manual_seed(0)
    model = build_model(name)
    sizes = resolve_partition(len(model), int(num_stages), costs=param_costs(module_layers(model)))
    slices, a = [], 0
    for n in sizes:
        slices.append(model[a:a + n])
        a += n
    meta = {"model": name, "batch": batch, "partition": sizes, "measured": "one thread, median of "
            f"{repeats}", "torch": torch.__version__}
    return profile_slices(slices, example_input(name, batch), repeats=repeats, warmup=warmup, meta=meta)
