"""Per-layer costs that the balanced partition equalises: parameter counts or measured time.

    >>> param_costs(describe_layers("mlp"))                          # doctest: +SKIP
    [5248.0, 0.0, 16512.0, 0.0, 1290.0]
    >>> measure_layer_times(model, example_input("mlp", 32))         # doctest: +SKIP
    [4.1e-05, 6.0e-06, ...]                                          # seconds, forward+backward

Parameter counts are exact and free; time is what the pipeline's clock period really depends
on (a convolution with few weights can be the slowest layer), but it is noisy and needs the
model and an example input. torch is imported only by `measure_layer_times`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from layerpipe.errors import PlanError
from layerpipe.plan.layers import LayerInfo

log = logging.getLogger(__name__)

BALANCE_MODES = ("params", "time")


def param_costs(layers: Sequence[LayerInfo]) -> list[float]:
    """Trainable parameter count per layer; unit costs when no layer has parameters (anonymous
    layers), so that balancing still spreads the layers evenly."""
    costs = [float(layer.params) for layer in layers]
    if not any(costs):
        return [1.0] * len(layers)
    return costs


def measure_layer_times(
    model: Any, example: Any, repeats: int = 5, warmup: int = 1, threads: int | None = 1
) -> list[float]:
    """Wall time (seconds, best of `repeats`) of forward plus backward of each child of `model`.

    Each layer is timed alone on the activation the previous layers produce for `example`,
    with a gradient of ones flowing back into it: the same work the layer's stage does per
    microbatch. Runs on whatever device `example` lives on; synchronises CUDA when used.
    Side effects on `model`: gradients are cleared afterwards, BatchNorm running statistics
    are not restored (plan on a fresh model).

    `threads` sets torch's intra-op threads while timing (restored afterwards). One thread by
    default: with more, a busy CPU deschedules one of the threads a small matmul splits over
    and the layer's time jumps by a scheduler slice (20 ms for a 128x128 Linear measured on
    2 shared cores, against 0.08 ms single-threaded), which ruins the balance.
    """
    import torch  # lazy: planning by parameter count must not need torch

    if repeats < 1:
        raise PlanError(f"repeats must be >= 1, got {repeats}")
    children = [child for _, child in model.named_children()]
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = _time_children(children, example, repeats, warmup, sync)
    finally:
        torch.set_num_threads(saved_threads)
    model.zero_grad(set_to_none=True)  # leave no gradients behind on the caller's model
    log.debug("measured layer times (s): %s", times)
    return times


def _time_children(children: list[Any], example: Any, repeats: int, warmup: int, sync: Any) -> list[float]:
    import torch

    times: list[float] = []
    x = example
    for child in children:
        samples = []
        for r in range(warmup + repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            sync()
            t0 = time.perf_counter()
            out = child(inp)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            sync()  # a host-device sync point: without it CUDA times only the launch
            if r >= warmup:
                samples.append(time.perf_counter() - t0)
        # the minimum, as timeit advises: noise from other processes only ever adds time
        times.append(min(samples))
        with torch.no_grad():
            x = child(x.detach())
    return times
