"""Delay compensation: each technique against a hand-written reference of its update rule.

The references use plain tensors and a few lines each; they do not call the code under test.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpipe.compensate import build_optimizer, make_compensation, parse_spec, pipeline_optimizer
from layerpipe.compensate.nesterov import delay_beta1
from layerpipe.engine.stage import Stage
from layerpipe.errors import LayerpipeError
from layerpipe.weights import make_strategy


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _params(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


# -- (a) nesterov --------------------------------------------------------------------------
def test_nesterov_beta1_rule():
    assert delay_beta1(0.9, 0, 0.99) == pytest.approx(0.9)
    assert delay_beta1(0.9, 6, 0.99) == pytest.approx(1 - 0.1 / 7)
    assert delay_beta1(0.9, 100, 0.99) == pytest.approx(0.99)


def test_nesterov_matches_reference():
    shapes = [(3, 4), (4,)]
    params, grads = _params(shapes), _grads(shapes, 5)
    ref = [p.detach().clone() for p in params]
    lr, wd, b2, eps = 0.01, 0.1, 0.999, 1e-8
    b1 = 1 - 0.1 / 5  # delay 4, base 0.9
    opt = make_compensation("nesterov", params, 4, lr=lr, weight_decay=wd)
    _run(opt, params, grads)
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    for t, gs in enumerate(grads, 1):
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mh = b1 * m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            vh = v[i] / (1 - b2**t)
            ref[i] = ref[i] * (1 - lr * wd) - lr * mh / (vh.sqrt() + eps)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)


# -- (b) error feedback --------------------------------------------------------------------
@pytest.mark.parametrize("per_delay", [False, True])
def test_error_feedback_matches_reference(per_delay):
    shapes = [(2, 3), (3,)]
    params, grads = _params(shapes), _grads(shapes, 4)
    ref = [p.detach().clone() for p in params]
    lr, c, delay = 0.1, 0.3, 2
    opt = make_compensation("error-feedback", params, delay, torch.optim.SGD(params, lr=lr), c=c, per_delay=per_delay)
    _run(opt, params, grads)
    ck = c * delay if per_delay else c
    prev = [torch.zeros_like(r) for r in ref]
    for gs in grads:
        for i, g in enumerate(gs):
            u = lr * g  # SGD's step
            ref[i] = ref[i] - u - ck * (u - prev[i])
            prev[i] = u
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    assert opt.history_bytes() == sum(p.numel() * 4 for p in params)


def test_error_feedback_leaves_undelayed_stage_alone():
    params = _params([(2, 2)])
    opt = make_compensation("error-feedback", params, 0, torch.optim.SGD(params, lr=0.1))
    assert opt.history_bytes() == 0


def test_error_feedback_state_round_trip():
    shapes = [(2, 3)]
    grads = _grads(shapes, 4)
    a, b = _params(shapes), _params(shapes)
    oa = make_compensation("error-feedback", a, 2, torch.optim.SGD(a, lr=0.1, momentum=0.9))
    ob = make_compensation("error-feedback", b, 2, torch.optim.SGD(b, lr=0.1, momentum=0.9))
    _run(oa, a, grads[:2])
    _run(ob, b, grads[:2])
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as a checkpoint would: no aliasing
    _run(oa, a, grads[2:])
    _run(ob, b, grads[2:])
    torch.testing.assert_close(a[0].detach(), b[0].detach())


# -- (d) accumulate ------------------------------------------------------------------------
def test_accumulate_matches_reference():
    shapes = [(2, 2)]
    params, grads = _params(shapes), _grads(shapes, 6)
    ref = params[0].detach().clone()
    opt = make_compensation("accumulate", params, 4, torch.optim.SGD(params, lr=0.5), every=3)
    history = []
    for gs in grads:
        params[0].grad = gs[0].clone()
        opt.step()
        history.append(params[0].detach().clone())
    expect = []
    for t in range(6):
        if t in (2, 5):
            ref = ref - 0.5 * (grads[t - 2][0] + grads[t - 1][0] + grads[t][0]) / 3
        expect.append(ref.clone())
    for got, want in zip(history, expect):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accumulate_per_delay():
    params = _params([(2, 2)])
    assert make_compensation("accumulate", params, 4, torch.optim.SGD(params, lr=0.1), per_delay=True).every == 5


# -- (e) pipemare --------------------------------------------------------------------------
@pytest.mark.parametrize("power, anneal", [(1.0, 10), (1.5, 10), (1.0, "never")])
def test_pipemare_matches_reference(power, anneal):
    shapes = [(3,)]
    params, grads = _params(shapes), _grads(shapes, 15)
    ref = params[0].detach().clone()
    lr, delay, warmup = 0.2, 4, 3
    sgd = torch.optim.SGD(params, lr=lr)
    opt = make_compensation("pipemare", params, delay, sgd, anneal=anneal, warmup=warmup, power=power)
    _run(opt, params, grads)
    for t, gs in enumerate(grads):
        warm = min(1.0, (t + 1) / warmup)
        exponent = power if anneal == "never" else power * (1.0 - min(1.0, t / anneal))
        ref = ref - lr * warm * delay**-exponent * gs[0]
    torch.testing.assert_close(params[0].detach(), ref, rtol=1e-5, atol=1e-6)
    assert sgd.param_groups[0]["lr"] == lr  # restored: an outer schedule still owns it


@pytest.mark.parametrize("delay, max_delay", [(2, 3), (0, 3), (0, 0)])
def test_pipemare_pipeline_lr_scales_every_stage_of_a_pipelined_run_only(delay, max_delay):
    shapes = [(3,)]
    params, grads = _params(shapes), _grads(shapes, 8)
    ref = params[0].detach().clone()
    lr, warmup, factor = 0.2, 3, 0.75
    opt = make_compensation("pipemare", params, delay, torch.optim.SGD(params, lr=lr), max_delay=max_delay,
                            anneal="never", warmup=warmup, pipeline_lr=factor)
    _run(opt, params, grads)
    for t, gs in enumerate(grads):
        f = factor if max_delay > 0 else 1.0  # a synchronous run (every delay 0) keeps its lr
        ref = ref - lr * min(1.0, (t + 1) / warmup) * max(1, delay) ** -1.0 * f * gs[0]
    torch.testing.assert_close(params[0].detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_delay", [3, 0])
def test_pipemare_pipeline_warmup_is_the_warmup_of_a_pipelined_run_only(max_delay):
    shapes = [(3,)]
    params, grads = _params(shapes), _grads(shapes, 8)
    ref = params[0].detach().clone()
    lr, warmup, pipeline_warmup = 0.2, 2, 6
    opt = make_compensation("pipemare", params, 0, torch.optim.SGD(params, lr=lr), max_delay=max_delay,
                            anneal="never", warmup=warmup, pipeline_warmup=pipeline_warmup)
    _run(opt, params, grads)
    ticks = pipeline_warmup if max_delay > 0 else warmup  # a synchronous run keeps `warmup`
    for t, gs in enumerate(grads):
        ref = ref - lr * min(1.0, (t + 1) / ticks) * gs[0]
    torch.testing.assert_close(params[0].detach(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(LayerpipeError, match="pipeline_warmup needs"):
        make_compensation("pipemare", params, 0, torch.optim.SGD(params, lr=lr), pipeline_warmup=6)


@pytest.mark.parametrize("rule", ["scaled", "pipeline", "full"])
def test_pipemare_adamw_rule_sets_what_the_adamw_part_gets(rule):
    # two SGD groups, one tagged as muon tags its AdamW part: the rule applies to that one only
    from layerpipe.compensate.muon import ADAMW_PART

    shapes = [(3,), (2,)]
    params, grads = _params(shapes), _grads(shapes, 6)
    refs = [p.detach().clone() for p in params]
    lr, delay, warmup, factor = 0.2, 3, 2, 0.75
    sgd = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "part": ADAMW_PART}], lr=lr)
    opt = make_compensation("pipemare", params, delay, sgd, max_delay=delay, anneal="never", warmup=warmup,
                            pipeline_lr=factor, adamw=rule)
    _run(opt, params, grads)
    tagged = {"scaled": factor / delay, "pipeline": factor, "full": 1.0}[rule]
    for t, gs in enumerate(grads):
        warm = min(1.0, (t + 1) / warmup)
        refs[0] = refs[0] - lr * warm * factor / delay * gs[0]
        refs[1] = refs[1] - lr * warm * tagged * gs[1]
    for p, ref in zip(params, refs):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)
    assert [g["lr"] for g in sgd.param_groups] == [lr, lr]  # restored


def test_pipemare_rejects_an_unknown_adamw_rule():
    params = _params([(3,)])
    with pytest.raises(LayerpipeError, match="adamw must be one of scaled, pipeline, full"):
        make_compensation("pipemare", params, 2, torch.optim.SGD(params, lr=0.1), adamw="half")


def test_muon_tags_its_adamw_part():
    from layerpipe.compensate.muon import ADAMW_PART

    params = _params([(4, 4), (4,)])
    opt = make_compensation("muon", params, 1)
    parts = [g.get("part") for g in opt.param_groups]
    assert parts == [None, ADAMW_PART]


def test_pipemare_pipeline_lr_needs_the_pipeline_and_a_sane_factor():
    params = _params([(3,)])
    with pytest.raises(LayerpipeError, match="pipeline_lr needs the pipeline's largest delay"):
        make_compensation("pipemare", params, 2, torch.optim.SGD(params, lr=0.1), pipeline_lr=0.5)
    with pytest.raises(LayerpipeError, match="pipeline_lr must be a factor"):
        make_compensation("pipemare", params, 2, torch.optim.SGD(params, lr=0.1), max_delay=2, pipeline_lr=0)


def test_pipemare_rejects_a_bad_anneal():
    params = _params([(3,)])
    for bad in ("sometimes", -5):
        with pytest.raises(LayerpipeError, match="anneal must be a number of ticks >= 0 or 'never'"):
            make_compensation("pipemare", params, 2, torch.optim.SGD(params, lr=0.1), anneal=bad)


# -- (f) muon ------------------------------------------------------------------------------
def _newton_schulz(g, a=3.4445, b=-4.775, c=2.0315, steps=5, eps=1e-7, dtype=torch.float32):
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_muon_matrices_and_adamw_rest(ns_dtype):
    shapes = [(8, 4), (4,)]
    params, grads = _params(shapes), _grads(shapes, 3)
    w0, b0 = (p.detach().clone() for p in params)
    lr, mom, wd = 0.02, 0.95, 0.1
    opt = make_compensation("muon", params, 0, lr=lr, momentum=mom, weight_decay=wd, ns_dtype=ns_dtype)
    _run(opt, params, grads)
    # Muon on the matrix (Nesterov momentum, orthogonalised, lr scaled to AdamW's RMS)
    buf, w = torch.zeros_like(w0), w0.clone()
    for gs in grads:
        g = gs[0]
        buf = mom * buf + (1 - mom) * g
        upd = (1 - mom) * g + mom * buf
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(8) * _newton_schulz(upd, dtype=getattr(torch, ns_dtype)).float()
    tol = 1e-5 if ns_dtype == "float32" else 2e-3  # bfloat16 is torch's own step: its rounding
    torch.testing.assert_close(params[0].detach(), w, rtol=tol, atol=tol)
    # AdamW on the vector
    m, v, b = torch.zeros_like(b0), torch.zeros_like(b0), b0.clone()
    for t, gs in enumerate(grads, 1):
        g = gs[1]
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        b = b * (1 - lr * 0.01) - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    torch.testing.assert_close(params[1].detach(), b, rtol=1e-5, atol=1e-6)
    assert len(opt.param_groups) == 2


def test_muon_per_delay_momentum():
    params = _params([(4, 4)])
    opt = make_compensation("muon", params, 6, per_delay=True, momentum=0.9, momentum_max=0.99)
    assert opt.muon.param_groups[0]["momentum"] == pytest.approx(1 - 0.1 / 7)


def test_muon_delayed_momentum_only_on_delayed_stages():
    params = _params([(4, 4)])
    assert make_compensation("muon", params, 4, delayed_momentum=0.8).muon.param_groups[0]["momentum"] == 0.8
    assert make_compensation("muon", params, 0, delayed_momentum=0.8).muon.param_groups[0]["momentum"] == 0.95
    with pytest.raises(LayerpipeError, match="give one"):
        make_compensation("muon", params, 4, delayed_momentum=0.8, per_delay=True)
    for bad in (1.5, "abc"):
        with pytest.raises(LayerpipeError, match=r"delayed_momentum must be a number in \[0, 1\)"):
            make_compensation("muon", params, 4, delayed_momentum=bad)


def test_muon_delayed_momentum_by_depth():
    """`delayed_momentum=depth`: every delayed stage takes 0.2 + 0.1 D, D the pipeline's
    largest delay (0.5 at D = 3, 0.9 at D = 7), never more than the undelayed stage's
    momentum (0.95 by default, 0.9 in the recipe)."""
    params = _params([(4, 4)])
    for delays, spec, want, undelayed in (((3, 2, 1, 0), "", 0.5, 0.95), ((1, 0), "", 0.3, 0.95),
                                          ((7, 6, 5, 4, 3, 2, 1, 0), "", 0.9, 0.95),
                                          ((8, 7, 6, 5, 4, 3, 2, 1, 0), ",momentum=0.9", 0.9, 0.9)):
        factory = pipeline_optimizer(delays, [f"muon:delayed_momentum=depth{spec}"])
        got = [factory(params).muon.param_groups[0]["momentum"] for _ in delays]
        assert got == pytest.approx([want] * (len(delays) - 1) + [undelayed])
    with pytest.raises(LayerpipeError, match="needs the pipeline's delays"):
        make_compensation("muon", params, 4, delayed_momentum="depth")
    with pytest.raises(LayerpipeError, match="max_delay is the pipeline's largest delay, not an option"):
        build_optimizer(params, 3, ["muon:max_delay=7"], max_delay=3)


def test_engine_passes_the_pipeline_depth_to_the_compensation():
    from layerpipe import Pipeline
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(8)])  # the last is the output: AdamW's
    pipe = Pipeline(model, stages=[2, 2, 2, 2], weights="ema", schedule="pipedream",
                    compensation=["muon:delayed_momentum=depth"])
    assert [s.delay for s in pipe.stages] == [3, 2, 1, 0]
    momenta = [s.optimizer.muon.param_groups[0]["momentum"] for s in pipe.stages]
    assert momenta == pytest.approx([0.5, 0.5, 0.5, 0.95])


def test_muon_leaves_embeddings_and_output_layer_to_adamw():
    """A pipeline tags the input embedding and the output layer's matrix; Muon keeps only the
    hidden matrix (io_adamw=False: every matrix, as before)."""
    from layerpipe import Pipeline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16, bias=False))
    emb, hidden, out = model[0].weight, model[1].weight, model[3].weight
    for io_adamw, on_muon in ((True, {id(hidden)}), (False, {id(emb), id(hidden), id(out)})):
        pipe = Pipeline(model, stages=[2, 2], weights="stash", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                        loss_fn=lambda y, t: y.sum(), compensation=[f"muon:io_adamw={io_adamw}"])
        muon = {id(p) for st in pipe.stages if st.optimizer.muon for g in st.optimizer.muon.param_groups
                for p in g["params"]}
        adamw = {id(p) for st in pipe.stages if st.optimizer.adamw for g in st.optimizer.adamw.param_groups
                 for p in g["params"]}
        assert muon == on_muon
        assert adamw == {id(p) for p in model.parameters()} - on_muon


def test_muon_missing_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(LayerpipeError, match="torch.optim.Muon"):
        make_compensation("muon", _params([(2, 2)]), 0)


# -- (c) predict ---------------------------------------------------------------------------
def _stage(weights, delay, c=1.0, lr=0.1):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    stage = Stage(
        0,
        module,
        delay,
        lambda ps, d, opt: make_strategy(weights, ps, d, opt),
        lambda ps: make_compensation("predict", ps, delay, torch.optim.SGD(ps, lr=lr), c=c),
        is_last=False,
    )
    stage.optimizer.attach(stage)
    return stage


def _tick(stage, mb, x, gout):
    stage.forward(mb, x)
    stage.backward(mb, gout)
    stage.update()


@pytest.mark.parametrize("weights", ["stash", "ema"])
def test_predict_forward_on_predicted_backward_on_strategy_weights(weights):
    delay, c = 2, 0.7
    stage = _stage(weights, delay, c)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 3, generator=g) for _ in range(6)]
    gouts = [torch.randn(5, 2, generator=g) for _ in range(6)]
    live = [p.detach() for p in stage.params]
    # reference EMA of applied updates (alpha = 2 / (d + 1)), kept by hand
    alpha, avg, steps = 2 / (delay + 1), [torch.zeros_like(p) for p in live], 0
    for mb in range(4):  # synchronous ticks to build up the average
        before = [p.clone() for p in live]
        _tick(stage, mb, xs[mb], gouts[mb])
        avg = [(1 - alpha) * a + alpha * (p - b) for a, p, b in zip(avg, live, before)]
        steps += 1
    w = [p.clone() for p in live]
    predicted = [p + c * delay * a / (1 - (1 - alpha) ** steps) for p, a in zip(w, avg)]
    out = stage.forward(10, xs[4])
    for p, want in zip(live, w):  # restored exactly after the forward
        assert torch.equal(p, want)
    w1, b1, w2, b2 = predicted
    h = xs[4] @ w1.T + b1
    a = torch.tanh(h)
    torch.testing.assert_close(out, a @ w2.T + b2, rtol=1e-5, atol=1e-6)
    stage.forward(11, xs[5])  # another forward, then an update between forward and backward
    stage.backward(11, gouts[5])
    stage.update()
    expected_bw = stage.strategy.backward_weights(stage.strategy.version - 1)  # version of mb 10
    bw = [t.clone() for t in expected_bw]
    stage.backward(10, gouts[4])
    # hand backward: activations from the predicted forward, weights from the strategy
    dh = (gouts[4] @ bw[2]) * (1 - a * a)
    torch.testing.assert_close(stage.params[2].grad, gouts[4].T @ a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stage.params[0].grad, dh.T @ xs[4], rtol=1e-5, atol=1e-6)
    if weights == "stash":
        torch.testing.assert_close(bw[2], w[2])  # exact: the live weights of that forward


def test_predict_reuses_the_ema_buffer():
    ema_stage, stash_stage = _stage("ema", 2), _stage("stash", 2)
    assert ema_stage.optimizer.history_bytes() == 0
    assert stash_stage.optimizer.history_bytes() == sum(p.numel() * 4 for p in stash_stage.params)


def test_predict_noop_without_delay():
    stage = _stage("stash", 0)
    assert stage.forward_context is None and stage.optimizer.history_bytes() == 0


# -- registry, specs, chains ---------------------------------------------------------------
def test_unknown_name_and_bad_option_are_layerpipe_errors():
    params = _params([(2, 2)])
    with pytest.raises(LayerpipeError, match="unknown compensation"):
        make_compensation("nope", params, 0)
    with pytest.raises(LayerpipeError, match="error-feedback"):
        make_compensation("error-feedback", params, 2, torch.optim.SGD(params, lr=0.1), bogus=1)


def test_parse_spec():
    assert parse_spec("error-feedback:c=0.5,per_delay=True") == ("error-feedback", {"c": 0.5, "per_delay": True})
    assert parse_spec("predict") == ("predict", {})


def test_chain_order_and_bytes():
    params = _params([(4, 4), (4,)])
    opt = build_optimizer(params, 4, ["predict", "error-feedback:c=0.5", "accumulate:every=2", "muon"])
    names = []
    o = opt
    while hasattr(o, "optimizer"):
        names.append(o.name)
        o = o.optimizer
    assert names == ["predict", "error-feedback", "accumulate"]
    size = sum(p.numel() * 4 for p in params)
    assert opt.history_bytes() == size  # error-feedback's previous update
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # outside the engine accumulate keeps its own sum, made at the first step
    assert opt.history_bytes() == 2 * size  # error-feedback's previous update + the gradient sum
    with pytest.raises(LayerpipeError, match="one optimizer"):
        build_optimizer(params, 4, ["muon", "nesterov"])


def test_pipeline_factory_attach_and_bytes():
    from layerpipe import Pipeline
    from layerpipe.compensate import attach, compensation_bytes, pipeline_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    delays = [4, 2, 0]
    specs = ["error-feedback:c=0.5", "predict"]
    pipe = Pipeline(model, stages=[2, 2, 1], weights="ema", optimizer=pipeline_optimizer(delays, specs, lambda ps: torch.optim.SGD(ps, lr=0.05)))
    attach(pipe)
    assert [s.optimizer.delay for s in pipe.stages] == delays
    assert [s.forward_context is not None for s in pipe.stages] == [True, True, False]
    # error-feedback keeps the previous update of the delayed stages; predict shares ema's buffer
    delayed = sum(p.numel() * 4 for s in pipe.stages[:2] for p in s.params)
    assert compensation_bytes(pipe) == delayed
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        pipe.step(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
    pipe.flush()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_muon_adamw_lr_scale_and_delayed_beta1():
    """The AdamW part runs at adamw_lr_scale x the lr, and set_lr (the training loop's lr
    schedule) keeps that ratio; delayed_adamw_beta1 only on stages with a delay."""
    from layerpipe.training.lr import set_lr

    params = _params([(4, 4), (4,)])
    opt = make_compensation("muon", params, 3, lr=0.02, adamw_lr_scale=0.25, delayed_adamw_beta1=0.8)
    assert opt.muon.param_groups[0]["lr"] == 0.02
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(0.005)
    assert opt.adamw.param_groups[0]["betas"] == (0.8, 0.999)
    set_lr([opt], [3], 0.01, "none")
    assert opt.muon.param_groups[0]["lr"] == 0.01 and opt.adamw.param_groups[0]["lr"] == pytest.approx(0.0025)
    assert make_compensation("muon", params, 0, delayed_adamw_beta1=0.8).adamw.param_groups[0]["betas"] == (0.9, 0.999)
    for bad in ({"adamw_lr_scale": 0}, {"delayed_adamw_beta1": 1.0}):
        with pytest.raises(LayerpipeError):
            make_compensation("muon", params, 3, **bad)


# -- (d) accumulate inside the engine: the sum kept in .grad --------------------------------
@pytest.mark.parametrize("schedule, every", [("pipedream", 2), ("layerpipe", 3)])
@pytest.mark.parametrize("keep", [True, False], ids=["sum-in-grad", "own-sum"])
def test_accumulate_in_the_engine_equals_handwritten_delayed_sgd(schedule, every, keep):
    from reference import AccumulatingOptimizer, delayed_sgd
    from test_engine import SGD_MOMENTUM, make_batches, make_model

    model, batches = make_model(torch.float64), make_batches(n=23, dtype=torch.float64)  # 23: one left over
    stages = [1, 3, 2, 1]
    delays = [(2 if schedule == "layerpipe" else 1) * (3 - k) for k in range(4)]

    def reference_opt(ps):
        return AccumulatingOptimizer(ps, SGD_MOMENTUM(ps), every)

    ref_model, ref_losses = delayed_sgd(model, stages, delays, batches, reference_opt, F.cross_entropy)
    from layerpipe import Pipeline

    pipe = Pipeline(model, stages=stages, weights="stash", optimizer=SGD_MOMENTUM, schedule=schedule,
                    loss_fn=F.cross_entropy, compensation=[f"accumulate:every={every}"])
    for s in pipe.stages:
        s.may_keep_grads = keep
    losses, peak = {}, [0] * 4  # peak: most weight versions a stage's stash held
    for x, y in batches:
        losses.update(pipe.step(x, y).losses)
        peak = [max(v, s.strategy.history_bytes() // s.parameter_bytes()) for v, s in zip(peak, pipe.stages)]
    # a tick that only adds a gradient makes no new version: ceil(d_k / A) of them, not d_k
    assert peak == [-(-d // every) for d in delays]
    for info in pipe.flush():
        losses.update(info.losses)
    assert [losses[m].item() for m in sorted(losses)] == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    own = [s.optimizer.own_bytes() for s in pipe.stages]
    if keep:  # the sum lived in .grad: no buffer of its own; 23 ticks leave a partial sum there
        assert own == [0, 0, 0, 0]
        assert all(p.grad is not None for p in pipe.stages[0].owned)
    else:
        assert own == [sum(p.numel() * 8 for p in s.owned) for s in pipe.stages]


def test_accumulate_differs_from_no_accumulation_so_the_test_has_teeth():
    from test_engine import SGD_MOMENTUM, make_batches, make_model, run_pipeline

    model, batches = make_model(torch.float64), make_batches(dtype=torch.float64)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    run_pipeline(a, batches, stages=[1, 3, 2, 1], weights="stash", optimizer=SGD_MOMENTUM, compensation=["accumulate:every=2"])
    run_pipeline(b, batches, stages=[1, 3, 2, 1], weights="stash", optimizer=SGD_MOMENTUM)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) > 1e-4


def test_accumulate_keeps_its_own_sum_where_each_ticks_gradient_is_clipped():
    from test_engine import SGD_MOMENTUM, make_batches, make_model, run_pipeline

    pipe, _ = run_pipeline(make_model(), make_batches(n=7), stages=[1, 3, 2, 1], weights="stash", optimizer=SGD_MOMENTUM,
                           clip_grad_norm=1.0, compensation=["accumulate:every=2"])
    assert not any(s.can_keep_grads for s in pipe.stages)
    assert [s.optimizer.own_bytes() for s in pipe.stages] == [sum(p.numel() * 4 for p in s.owned) for s in pipe.stages]


def test_stash_stays_exact_where_error_feedback_moves_the_weights_between_accumulated_updates():
    """error-feedback outside an accumulation moves the weights on the tick after an update
    (c (delta - prev) with delta = 0), so those ticks are versions too: stash must still equal
    the delayed-SGD loop (exact past weights) running the same optimizer chain."""
    from reference import delayed_sgd
    from test_engine import SGD_MOMENTUM, make_batches, make_model

    from layerpipe import Pipeline

    model, batches = make_model(torch.float64), make_batches(n=15, dtype=torch.float64)
    stages, delays = [1, 3, 2, 1], [3, 2, 1, 0]
    chain = ["accumulate:every=2", "error-feedback:c=0.5"]
    made = iter(delays)  # the reference builds one optimizer per stage, in stage order

    def reference_opt(ps):
        return build_optimizer(ps, next(made), chain, base=SGD_MOMENTUM)

    ref_model, ref_losses = delayed_sgd(model, stages, delays, batches, reference_opt, F.cross_entropy)
    pipe = Pipeline(model, stages=stages, weights="stash", optimizer=SGD_MOMENTUM, schedule="pipedream",
                    loss_fn=F.cross_entropy, compensation=chain)
    losses = {}
    for x, y in batches:
        losses.update(pipe.step(x, y).losses)
    for info in pipe.flush():
        losses.update(info.losses)
    assert [losses[m].item() for m in sorted(losses)] == pytest.approx(ref_losses, rel=1e-10)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
