"""The tick engine against independent references: plain PyTorch and hand-written delayed SGD."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpipe import Pipeline
from layerpipe.errors import LayerpipeError, PlanError, TrainingDiverged
from reference import delayed_sgd, plain_training


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    ).to(dtype)


def make_batches(n=24, bs=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 6, generator=g, dtype=dtype)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()))
    return out


SGD_MOMENTUM = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
ADAM = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731


def run_pipeline(model, batches, **kw):
    pipe = Pipeline(model, loss_fn=F.cross_entropy, **kw)
    losses = {}
    for x, y in batches:
        losses.update(pipe.step(x, y).losses)
    for info in pipe.flush():
        losses.update(info.losses)
    return pipe, [losses[m].item() for m in sorted(losses)]


@pytest.mark.parametrize("opt", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
def test_sync_equals_plain_pytorch_bit_for_bit(opt):
    model, batches = make_model(), make_batches()
    reference = copy.deepcopy(model)
    ref_losses = plain_training(reference, batches, opt, F.cross_entropy)
    _, losses = run_pipeline(model, batches, stages=[1, 3, 2, 1], weights="sync", optimizer=opt)
    assert losses == ref_losses
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("weights", ["stash", "ema", "latest", "extrapolate", "weight-ema"])
def test_one_stage_equals_plain_pytorch_bit_for_bit(weights):
    model, batches = make_model(), make_batches()
    reference = copy.deepcopy(model)
    ref_losses = plain_training(reference, batches, SGD_MOMENTUM, F.cross_entropy)
    _, losses = run_pipeline(model, batches, stages=[7], weights=weights, optimizer=SGD_MOMENTUM)
    assert losses == ref_losses
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
@pytest.mark.parametrize("opt", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("stages", [[1, 3, 2, 1], [4, 3], [2, 1, 1, 1, 2]])
def test_stash_equals_handwritten_delayed_sgd(stages, opt, schedule, backward_path):
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    K = len(stages)
    delays = [(2 if schedule == "layerpipe" else 1) * (K - 1 - k) for k in range(K)]
    ref_model, ref_losses = delayed_sgd(model, stages, delays, batches, opt, F.cross_entropy)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="stash", optimizer=opt, schedule=schedule)
    assert pipe.delays == delays
    assert any(s.swaps for s in pipe.stages) == (backward_path == "swap")  # the path asked for
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_stash_differs_from_latest_so_the_reference_test_has_teeth():
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    ref_model, _ = delayed_sgd(model, [1, 3, 2, 1], [6, 4, 2, 0], batches, SGD_MOMENTUM, F.cross_entropy)
    run_pipeline(model, batches, stages=[1, 3, 2, 1], weights="latest", optimizer=SGD_MOMENTUM)
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref_model.parameters()))
    assert diff > 1e-6


def test_custom_delays_match_reference(backward_path):
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    delays = [7, 5, 3, 1]
    ref_model, ref_losses = delayed_sgd(model, [1, 3, 2, 1], delays, batches, SGD_MOMENTUM, F.cross_entropy)
    _, losses = run_pipeline(model, batches, stages=[1, 3, 2, 1], weights="stash", optimizer=SGD_MOMENTUM, delays=delays)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_conv_and_batchnorm_model_matches_reference(backward_path):
    """Views of saved weights (conv, linear's transpose) and BatchNorm buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)
    ).double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 1, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)) for _ in range(12)]
    ref_model, ref_losses = delayed_sgd(model, [2, 2, 2], [4, 2, 0], batches, SGD_MOMENTUM, F.cross_entropy)
    _, losses = run_pipeline(model, batches, stages=[2, 2, 2], weights="stash", optimizer=SGD_MOMENTUM)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_spiking_network_matches_reference():
    """A custom autograd.Function (surrogate spike) and BatchNorm over T*B frames, Adam."""
    from layerpipe.models import build_model

    torch.manual_seed(0)
    model = build_model("snn", time_steps=3).double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)) for _ in range(8)]
    adam = lambda ps: torch.optim.Adam(ps, lr=3e-3)  # noqa: E731
    ref_model, ref_losses = delayed_sgd(model, [2, 2, 1], [4, 2, 0], batches, adam, F.cross_entropy)
    _, losses = run_pipeline(model, batches, stages=[2, 2, 1], weights="stash", optimizer=adam)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_tick_semantics_staleness_and_draining():
    model, batches = make_model(), make_batches(n=10)
    pipe = Pipeline(model, stages=[1, 3, 2, 1], weights="stash", optimizer=SGD_MOMENTUM)
    infos = [pipe.step(x, y) for x, y in batches] + pipe.flush()
    K, d = 4, [6, 4, 2, 0]
    # the last stage's loss of microbatch m appears at tick m + K - 1
    for info in infos:
        assert sorted(info.losses) == ([info.tick - (K - 1)] if 0 <= info.tick - (K - 1) < 10 else [])
    # stage k updates at ticks m + k + d_k; steady-state staleness is d_k updates
    for k in range(K):
        ticks = [i.tick for i in infos if i.staleness[k] is not None]
        assert ticks == [m + k + d[k] for m in range(10)]
    assert infos[12].staleness[0] == 6  # microbatch 6 at stage 0: six updates since its forward
    assert len(infos) == 10 + 6 and pipe.in_flight() == 0


def test_stash_bytes_match_tensors_held_and_formula():
    model, batches = make_model(), make_batches(n=12)
    pipe = Pipeline(model, stages=[2, 2, 2, 1], weights="stash", optimizer=SGD_MOMENTUM)
    for x, y in batches:
        pipe.step(x, y)
    held = sum(
        t.numel() * t.element_size() for s in pipe.stages for buf in s.strategy._saved.values() for t in buf.flats
    )
    assert pipe.weight_history_bytes() == held
    expected = sum(d * s.parameter_bytes() for d, s in zip(pipe.delays, pipe.stages))
    assert held == expected


def test_ema_holds_at_most_one_copy():
    model = make_model()
    pipe = Pipeline(model, stages=[2, 2, 2, 1], weights="ema")
    last = pipe.stages[-1].parameter_bytes()
    assert pipe.weight_history_bytes() == pipe.parameter_bytes() - last  # the last stage has d = 0


def test_bad_input_raises_clear_errors():
    with pytest.raises(PlanError, match="hold 5 layers"):
        Pipeline(make_model(), stages=[2, 3])
    with pytest.raises(LayerpipeError, match="unknown weight strategy"):
        Pipeline(make_model(), stages=2, weights="magic")
    with pytest.raises(PlanError, match="nn.Sequential"):
        Pipeline(nn.Linear(2, 2), stages=1)
    with pytest.raises(PlanError):
        Pipeline(make_model(), stages=[4, 3], delays=[0, 0])


def test_nan_loss_stops_training():
    model = make_model()
    pipe = Pipeline(model, stages=[4, 3], weights="ema")
    x = torch.full((4, 6), float("nan"))
    with pytest.raises(TrainingDiverged, match="nan"):
        for _ in range(3):
            pipe.step(x, torch.zeros(4, dtype=torch.long))


def test_transformer_stash_matches_reference(backward_path):
    """Attention and 3-D linear layers save transposed views of weights: still exact."""
    from layerpipe.data import loss_fn
    from layerpipe.models import build_model

    torch.manual_seed(0)
    model = build_model("gpt", n_layer=2, d_model=32, n_head=2, input_shape=(16,)).double()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (4, 17), generator=g) for _ in range(8)]
    batches = [(s[:, :-1], s[:, 1:]) for s in seqs]
    loss, opt = loss_fn("language"), (lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    start = copy.deepcopy(model)
    ref_model, ref_losses = delayed_sgd(model, [1, 1, 1, 1], [6, 4, 2, 0], batches, opt, loss)
    pipe = Pipeline(model, stages=[1, 1, 1, 1], weights="stash", optimizer=opt, loss_fn=loss)
    for x, y in batches:
        pipe.step(x, y)
    pipe.flush()
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start.parameters()))


@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
@pytest.mark.parametrize("opt", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("stages", [[1, 3, 2, 1], [2, 1, 1, 1, 2]])
def test_ema_equals_handwritten_rebuilt_delayed_sgd(stages, opt, schedule, backward_path):
    """`ema` against a plain re-statement of its rule (tests/reference.py): a backward on W_now -
    n u_hat, u the EMA of the applied updates (the 1F1B timing has stages with d = 1, whose
    average is the last update); not bit for bit (the engine keeps the average another way),
    to float64 rounding."""
    from reference import delayed_sgd_rebuilt

    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    K = len(stages)
    delays = [(2 if schedule == "layerpipe" else 1) * (K - 1 - k) for k in range(K)]
    ref_model, ref_losses = delayed_sgd_rebuilt(model, stages, delays, batches, opt, F.cross_entropy)
    stash_model, _ = delayed_sgd(model, stages, delays, batches, opt, F.cross_entropy)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="ema", optimizer=opt, schedule=schedule)
    assert pipe.delays == delays
    assert losses == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # and not by accident: the reconstruction is not the exact history
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), stash_model.parameters())) > 1e-6


@pytest.mark.parametrize("hidden", [True, False], ids=["updates-hidden", "hooks"])
@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
@pytest.mark.parametrize("opt", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("stages", [[1, 3, 2, 1], [4, 3]])
def test_latest_equals_handwritten_backward_on_the_live_weights(stages, opt, schedule, hidden, monkeypatch):
    """`latest` against a plain re-statement (tests/reference.py): each backward uses its
    forward's activations and the weights as they are at the backward's tick, on both ways the
    engine lets autograd read weights updated after the forward (version counters set back
    after the step; identity saved-tensor hooks where torch lacks that)."""
    import layerpipe.engine.stage as stage_module
    from reference import delayed_sgd_rebuilt

    if not hidden:
        monkeypatch.setattr(stage_module, "set_versions", None)
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    K = len(stages)
    delays = [(2 if schedule == "layerpipe" else 1) * (K - 1 - k) for k in range(K)]
    ref_model, ref_losses = delayed_sgd_rebuilt(model, stages, delays, batches, opt, F.cross_entropy, live_weights=True)
    stash_model, _ = delayed_sgd(model, stages, delays, batches, opt, F.cross_entropy)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="latest", optimizer=opt, schedule=schedule)
    assert [s.hides_updates for s in pipe.stages] == [hidden] * K
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # the test has teeth: the live weights are not the forward's
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), stash_model.parameters())) > 1e-6


@pytest.mark.parametrize("schedule, every", [("layerpipe", 2), ("layerpipe", 3), ("pipedream", 2), ("pipedream", 4)])
@pytest.mark.parametrize("opt", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
def test_ema_under_accumulation_counts_updates_not_ticks(opt, schedule, every):
    """With one update every A ticks, `ema` rebuilds W_now - n u_hat with n the updates (not the
    ticks) since the forward and u the EMA of the updates, decay 2 / (ceil(d / A) + 1): the
    reference's rule with its own accumulation (tests/reference.py). Where ceil(d / A) is 1
    that is the exact history."""
    from reference import AccumulatingOptimizer, delayed_sgd_rebuilt

    model, batches = make_model(torch.float64), make_batches(n=27, dtype=torch.float64)
    stages = [1, 3, 2, 1]
    delays = [(2 if schedule == "layerpipe" else 1) * (3 - k) for k in range(4)]
    ref_model, ref_losses = delayed_sgd_rebuilt(model, stages, delays, batches, opt, F.cross_entropy, every=every)
    stash_model, _ = delayed_sgd(model, stages, delays, batches, lambda ps: AccumulatingOptimizer(ps, opt(ps), every),
                                 F.cross_entropy)  # exact history (before the pipeline trains `model`)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="ema", optimizer=opt, schedule=schedule,
                                compensation=[f"accumulate:every={every}"])
    assert [s.strategy.delay for s in pipe.stages] == [-(-d // every) for d in delays]
    assert losses == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    gap = max((p - q).abs().max().item() for p, q in zip(model.parameters(), stash_model.parameters()))
    # stage 0's backward weights make no input gradient, so they never matter
    if all(-(-d // every) <= 1 for d in delays[1:]):
        assert gap < 1e-12  # one update back at most: the weights before the last update, exactly
    else:
        assert gap > 1e-6  # and not by accident: the reconstruction is not the exact history
