"""`fused_update=True` (the strategy's passes and the SGD step as one compiled loop per tensor)
against independent references: plain PyTorch and the hand-written delayed-SGD loops of
tests/reference.py, in float64; against the unfused engine for SGD's options, learning-rate
schedules and a resumed checkpoint; and its refusals. Each test also checks that the updates
did fuse (a fused run that quietly ran unfused would pass the equality checks)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from layerpipe import Pipeline
from layerpipe.errors import LayerpipeError
from reference import delayed_sgd, delayed_sgd_rebuilt, plain_training
from test_engine import make_batches, make_model, run_pipeline

SGD = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
ADAM = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
OPTIMIZERS = {"sgd-momentum": SGD, "adam": ADAM}


@pytest.fixture(autouse=True)
def fuse_small_stages(monkeypatch):
    """These models' stages are far under the 1 MiB below which a stage stays unfused."""
    import layerpipe.engine.fused as fused

    monkeypatch.setattr(fused, "MIN_FUSED_BYTES", 0)


def assert_fused(pipe: Pipeline, unfused_per_stage: int = 1) -> None:
    """Every stage's updates fused but SGD's first (which makes the momentum buffer)."""
    for stage in pipe.stages:
        updates = stage.strategy.version
        assert updates > unfused_per_stage
        assert stage.fused is not None and stage.fused.fused_steps == updates - unfused_per_stage


def test_sync_fused_equals_plain_pytorch():
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    ref_losses = plain_training(ref_model, batches, SGD, F.cross_entropy)
    pipe, losses = run_pipeline(model, batches, stages=[2, 2, 3], weights="sync", optimizer=SGD, fused_update=True)
    assert_fused(pipe)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_stash_fused_equals_handwritten_delayed_sgd(opt, backward_path):
    stages = [1, 3, 2, 1]
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    K = len(stages)
    delays = [2 * (K - 1 - k) for k in range(K)]
    ref_model, ref_losses = delayed_sgd(model, stages, delays, batches, OPTIMIZERS[opt], F.cross_entropy)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="stash", optimizer=OPTIMIZERS[opt],
                                fused_update=True)
    assert_fused(pipe)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
def test_ema_fused_equals_handwritten_rebuilt_delayed_sgd(schedule, opt, backward_path):
    """The reconstruction W_now - n u_hat written plainly (tests/reference.py), d = 1 stages
    (pipedream) included: their buffer is a copy of the weights before the last update."""
    stages = [1, 3, 2, 1]
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    delays = [(2 if schedule == "layerpipe" else 1) * (3 - k) for k in range(4)]
    ref_model, ref_losses = delayed_sgd_rebuilt(model, stages, delays, batches, OPTIMIZERS[opt], F.cross_entropy)
    stash_model, _ = delayed_sgd(model, stages, delays, batches, OPTIMIZERS[opt], F.cross_entropy)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="ema", optimizer=OPTIMIZERS[opt],
                                schedule=schedule, fused_update=True)
    assert_fused(pipe)
    assert losses == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), stash_model.parameters())) > 1e-6


def test_latest_fused_equals_handwritten_backward_on_the_live_weights():
    stages = [1, 3, 2, 1]
    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    delays = [2 * (3 - k) for k in range(4)]
    ref_model, ref_losses = delayed_sgd_rebuilt(model, stages, delays, batches, SGD, F.cross_entropy,
                                                live_weights=True)
    pipe, losses = run_pipeline(model, batches, stages=stages, weights="latest", optimizer=SGD, fused_update=True)
    assert_fused(pipe)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


OPTIONS = {
    "sgd-nesterov-wd": (torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd-dampening-maximize": (torch.optim.SGD, dict(momentum=0.8, dampening=0.3, maximize=True)),
    "sgd-no-momentum": (torch.optim.SGD, dict(momentum=0.0)),
    "adam-wd-maximize": (torch.optim.Adam, dict(weight_decay=1e-2, betas=(0.8, 0.95), maximize=True)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=0.1)),
}


@pytest.mark.parametrize("weights", ["stash", "ema"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_fused_equals_unfused_for_sgds_options_and_groups(weights, options):
    """The optimizers' options, two parameter groups (weights and biases, another lr each) and a
    learning-rate schedule (the lr enters as a tensor: no recompile, no stale value)."""
    cls, kw = OPTIONS[options]
    lr = 0.05 if cls is torch.optim.SGD else 0.01

    def opt(ps):  # maximize climbs -loss below: the same descent
        return cls([{"params": [p for p in ps if p.dim() > 1]},
                    {"params": [p for p in ps if p.dim() == 1], "lr": lr / 2}], lr=lr, **kw)

    def loss_fn(out, y):
        return -F.cross_entropy(out, y) if kw.get("maximize") else F.cross_entropy(out, y)

    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5)  # noqa: E731
    batches = make_batches(n=30)
    results = []
    for fused in (False, True):
        model = make_model()
        pipe = Pipeline(model, stages=[2, 3, 2], weights=weights, optimizer=opt, loss_fn=loss_fn,
                        lr_scheduler=sched, fused_update=fused)
        for x, y in batches:
            pipe.step(x, y)
        pipe.flush()
        if fused:
            assert_fused(pipe, unfused_per_stage=0 if kw.get("momentum", 1) == 0 else 1)
        results.append([p.detach().clone() for p in model.parameters()])
    start = make_model()
    for p, q, p0 in zip(*results, start.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, p0) for p, p0 in zip(results[1], start.parameters()))


def test_fused_run_resumed_from_a_checkpoint_continues_as_before():
    """A checkpoint replaces SGD's momentum buffers: the fused update must use the loaded ones."""
    batches = make_batches(n=20)

    def run(pipe, part):
        for x, y in part:
            pipe.step(x, y)
        pipe.flush()

    model = make_model()
    pipe = Pipeline(model, stages=[2, 3, 2], weights="ema", optimizer=SGD, fused_update=True)
    run(pipe, batches[:10])
    state, model_state = copy.deepcopy(pipe.state_dict()), copy.deepcopy(model.state_dict())
    run(pipe, batches[10:])
    resumed_model = make_model(seed=5)
    resumed_model.load_state_dict(model_state)
    resumed = Pipeline(resumed_model, stages=[2, 3, 2], weights="ema", optimizer=SGD, fused_update=True)
    resumed.load_state_dict(state)
    run(resumed, batches[10:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert all(s.fused.fused_steps >= 5 for s in resumed.stages)


def test_a_strategy_without_passes_runs_unfused_and_says_so(caplog):
    batches = make_batches(n=12)
    results = []
    for fused in (False, True):
        model = make_model()
        with caplog.at_level(logging.WARNING, logger="layerpipe.engine.fused"):
            pipe = Pipeline(model, stages=[2, 3, 2], weights="extrapolate", optimizer=SGD, fused_update=fused)
            for x, y in batches:
                pipe.step(x, y)
            pipe.flush()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*results))
    warned = [r for r in caplog.records if "runs unfused" in r.getMessage()]
    assert len(warned) == len(pipe.stages)  # once per stage, not every tick
    assert all(s.fused.fused_steps == 0 for s in pipe.stages)


def test_a_stage_under_the_size_floor_stays_unfused_and_says_so(monkeypatch, caplog):
    import layerpipe.engine.fused as fused

    monkeypatch.setattr(fused, "MIN_FUSED_BYTES", 2**20)
    wide = torch.nn.Sequential(torch.nn.Linear(6, 600), torch.nn.Tanh(), torch.nn.Linear(600, 600), torch.nn.Tanh(),
                               torch.nn.Linear(600, 3))  # stage 1: 600 x 600 floats, 1.4 MiB
    with caplog.at_level(logging.INFO, logger="layerpipe.engine.fused"):
        pipe = Pipeline(wide, stages=[2, 3], weights="ema", optimizer=SGD, fused_update=True)
    assert pipe.stages[0].fused is None and pipe.stages[1].fused is not None
    assert any(r.getMessage().startswith("stage 0: 0.02 MiB of parameters, under fused_update's 1.00 MiB")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    for x, y in make_batches(n=6):
        pipe.step(x[:, :6], y)
    assert pipe.stages[1].fused.fused_steps > 0


@pytest.mark.parametrize("kw, needle", [
    (dict(optimizer=lambda ps: torch.optim.RMSprop(ps, lr=1e-3)),
     "supports torch.optim.SGD, Adam and AdamW; stage 0's optimizer is RMSprop"),
    (dict(optimizer=SGD, compensation=["nesterov"]), "supports torch.optim.SGD, Adam and AdamW; stage 0's"),
    (dict(optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True)), "Adam with amsgrad=True is not"),
])
def test_what_cannot_fuse_is_refused_in_one_line(kw, needle):
    with pytest.raises(LayerpipeError, match=needle.replace(".", r"\.")):
        Pipeline(make_model(), stages=[2, 3, 2], weights="ema", fused_update=True, **kw)


def test_cli_refuses_fused_update_with_a_compensation(capsys):
    from layerpipe.cli.main import main

    assert main(["train", "--fused-update", "--compensation", "nesterov", "--epochs", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["layerpipe train: error: --fused-update fuses the optimizer's own step; --compensation nesterov "
                   "wraps it (give --compensation none)"]


def test_a_loop_that_cannot_compile_ends_in_one_line(monkeypatch):
    """Where torch.compile fails (no C++ compiler, say), the run stops with a LayerpipeError
    naming the stage and the way out, not a compiler's traceback mid-training."""
    import layerpipe.engine.fused as fused

    def broken(loop, name):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return call

    monkeypatch.setattr(fused, "_compiled", broken)
    pipe = Pipeline(make_model(), stages=[2, 3, 2], weights="ema", optimizer=SGD, fused_update=True)
    with pytest.raises(LayerpipeError, match=r"^fused_update: stage \d's compiled update failed \(RuntimeError: "
                                             r"InvalidCxxCompiler: No working C\+\+ compiler found\); run without "
                                             r"fused_update$"):
        for x, y in make_batches(n=12):
            pipe.step(x, y)


def test_a_pipeline_where_nothing_fuses_says_so(monkeypatch, caplog):
    import layerpipe.engine.fused as fused

    monkeypatch.setattr(fused, "MIN_FUSED_BYTES", 2**20)
    with caplog.at_level(logging.WARNING, logger="layerpipe.engine.build"):
        pipe = Pipeline(make_model(), stages=[2, 3, 2], weights="ema", optimizer=SGD, fused_update=True)
    assert all(s.fused is None for s in pipe.stages)
    assert [r.getMessage() for r in caplog.records] == [
        "fused_update: every stage holds under 1 MiB of parameters; the updates stay unfused (a compiled call "
        "would cost more than it saves)"]
