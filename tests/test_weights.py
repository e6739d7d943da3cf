"""Weight strategies: reconstruction quality measured against exact stashing, memory counted
from the tensors held."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layerpipe import Pipeline
from layerpipe.weights import FlatBuffer, make_strategy
from layerpipe.errors import LayerpipeError


def _teacher_task(seed=0, n=2048, dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, 10, generator=g)).argmax(1)
    return x, y


@pytest.mark.parametrize(
    "optimizer",
    [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-3)],
    ids=["sgd-momentum", "adam"],
)
def test_ema_reconstruction_error_is_a_small_fraction_of_latest(optimizer):
    """During a real run, at every backward the EMA rebuild of the forward's weights is
    compared with the exact stashed version. Measured: 4-13% of `latest`'s error (the
    error of not correcting at all); the test asserts under 25%, and that last-update
    extrapolation, the simpler estimator, is worse than `ema`."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(6)], nn.Linear(32, 10))
    x, y = _teacher_task()
    pipe = Pipeline(model, stages=4, weights="probe", optimizer=optimizer)
    for _ in range(2):
        for i in range(0, len(x), 32):
            pipe.step(x[i : i + 32], y[i : i + 32])
    pipe.flush()
    for stage in pipe.stages[:-1]:
        probe = stage.strategy
        assert probe.backwards > 50
        errors = probe.errors()
        assert errors["latest"] > 0
        assert errors["ema"] < 0.25 * errors["latest"], (stage.index, probe.relative_errors())
        assert errors["ema"] < errors["extrapolate"], (stage.index, probe.relative_errors())


def test_ema_is_exact_for_constant_updates():
    """With identical updates every step, W_now - n * u_hat equals the old weights."""
    p = torch.zeros(5, dtype=torch.float64)
    s = make_strategy("ema", [p], delay=4)
    versions = []
    for _ in range(10):
        versions.append((s.record_forward(), p.clone()))
        s.before_update()
        p.add_(0.3)
        s.after_update()
    for version, then in versions[-4:]:
        torch.testing.assert_close(s.backward_weights(version)[0], then)


def test_flat_buffer_counts_bytes_and_mirrors_params():
    params = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(2)]
    buf = FlatBuffer(params)
    buf.copy_from(params)
    assert buf.nbytes == (12 + 2) * 4 + 5 * 8
    for v, p in zip(buf.views, params):
        assert v.shape == p.shape and v.dtype == p.dtype and torch.equal(v, p)


@pytest.mark.parametrize("name,copies", [("stash", None), ("ema", 1), ("latest", 0), ("extrapolate", 1), ("momentum", 0)])
def test_history_bytes_in_steady_state(name, copies):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    pipe = Pipeline(model, stages=4, weights=name, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
    for _ in range(20):  # past start-up: stage 0 first updates at tick 6
        pipe.step(torch.randn(4, 8), torch.randint(0, 8, (4,)))
    per_stage = 8 * 8 * 4 + 8 * 4
    delays = [6, 4, 2, 0]
    expected = sum(delays) * per_stage if copies is None else copies * per_stage * 3
    assert pipe.weight_history_bytes() == expected


def test_momentum_needs_sgd_with_momentum():
    with pytest.raises(LayerpipeError, match="SGD with momentum"):
        Pipeline(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), stages=2, weights="momentum",
                 optimizer=lambda ps: torch.optim.Adam(ps))


@pytest.mark.parametrize("name", ["stash", "ema", "latest", "extrapolate", "weight-ema", "momentum", "probe"])
def test_stage_without_parameters(name):
    """A stage holding only an activation (a model split into its layers) has nothing to keep."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    pipe = Pipeline(model, stages=[1, 1, 1], weights=name, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    for _ in range(8):
        pipe.step(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    pipe.flush()
    assert pipe.stages[1].strategy.history_bytes() == 0


@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
def test_ema_backward_in_the_steady_state_reads_its_buffer_as_it_is(schedule):
    """The rebuild for n = d_k updates back is kept in the buffer itself by the updates, so the
    steady state's backward takes it without a pass (the speed of `ema`); another n gets new
    tensors and leaves the buffer untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    pipe = Pipeline(model, stages=4, weights="ema", schedule=schedule,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
    for _ in range(20):
        pipe.step(torch.randn(4, 8), torch.randint(0, 8, (4,)))
    for stage in pipe.stages[:-1]:
        s = stage.strategy
        assert s.backward_weights(s.version - s.delay) is s._avg.views
        before = [t.clone() for t in s._avg.views]
        other = s.backward_weights(s.version - s.delay + 1) if s.delay > 1 else None
        if other is not None:
            assert other is not s._avg.views
            assert all(torch.equal(a, b) for a, b in zip(before, s._avg.views))
