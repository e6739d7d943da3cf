"""Pipeline on any model (issue 13): models cut at named submodules, several tensors crossing a
boundary, tied parameters, mixed precision, activation checkpointing, clipping, schedulers.

Every test compares against plain PyTorch (`sync`) or against `delayed_reference` below: a
hand-written simulation of delayed SGD on plain tensors (no layerpipe code), in which the
gradient of microbatch m is taken at the point where stage j reads every parameter it uses
at its value at the start of tick m + j, and the stage owning a parameter (its first user)
applies at tick m + k + d_k the sum of all its users' gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from layerpipe import Pipeline
from layerpipe.errors import LayerpipeError, PlanError


def delayed_reference(params, uses, stage_fns, delays, batches, loss_fn, make_opt, autocast=None):
    """params: name -> initial tensor; uses[j]: the names stage j reads; stage_fns[j](w, h)
    runs stage j with weights w (name -> tensor) on h (stage 0: the model's inputs). Returns the
    trained name -> tensor."""
    live = {n: t.detach().clone() for n, t in params.items()}
    K, M = len(uses), len(batches)
    owner: dict[str, int] = {}
    for j, names in enumerate(uses):
        for n in names:
            owner.setdefault(n, j)
    owned = [[n for n in live if owner.get(n) == k] for k in range(K)]
    opts = [make_opt([live[n] for n in owned[k]]) if owned[k] else None for k in range(K)]
    history: list[dict[str, torch.Tensor]] = []  # history[t]: every parameter at the start of tick t
    t = 0
    while True:
        history.append({n: w.clone() for n, w in live.items()})
        due = [(k, t - k - delays[k]) for k in range(K) if 0 <= t - k - delays[k] < M]
        if not due and t >= M + K + max(delays):
            break
        for k, m in due:
            if not owned[k]:
                continue
            x, y = batches[m]
            point = [{n: history[m + j][n].clone().requires_grad_(True) for n in uses[j]} for j in range(K)]
            with torch.autocast("cpu", dtype=autocast) if autocast else torch.enable_grad():
                h = x
                for j in range(K):
                    h = stage_fns[j](point[j], h)
                loss = loss_fn(h, y)
            leaves = [(j, n) for j in range(K) for n in uses[j] if owner[n] == k]
            grads = torch.autograd.grad(loss, [point[j][n] for j, n in leaves], allow_unused=True)
            total: dict[str, torch.Tensor] = {}
            for (_, n), g in zip(leaves, grads):
                if g is not None:
                    total[n] = total[n] + g if n in total else g
            for n in owned[k]:
                live[n].grad = total.get(n)
            opts[k].step()
            for n in owned[k]:
                live[n].grad = None
        t += 1
    return live


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def assert_params(model, want, atol, rtol=0.0):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], atol=atol, rtol=rtol, msg=n)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# -- a non-Sequential model: keyword inputs, an integer mask crossing boundaries, tied weights ----
class TiedNet(nn.Module):
    """Embedding tied to the output head; split at "mid" and "head" it is 3 stages, all three
    reading the embedding (stage 1, delayed, also as a matrix: its backward needs the weight's
    value), and the integer token ids and mask crossing the boundaries."""

    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, mask):
        h = torch.tanh(self.body(self.emb(ids)))
        h = torch.tanh(self.mid(h)) + F.linear(h, self.emb.weight[:8]) + 0.5 * self.emb(ids)
        return self.head(h * mask.unsqueeze(-1).to(h.dtype))


TIED_USES = [["emb.weight", "body.weight", "body.bias"], ["mid.weight", "mid.bias", "emb.weight"], ["emb.weight"]]


def tied_stage_fns():
    """TiedNet written out by hand, stage by stage."""

    def s0(w, inp):
        ids, mask = inp
        return torch.tanh(F.linear(F.embedding(ids, w["emb.weight"]), w["body.weight"], w["body.bias"])), ids, mask

    def s1(w, inp):
        h, ids, mask = inp
        e = w["emb.weight"]
        return torch.tanh(F.linear(h, w["mid.weight"], w["mid.bias"])) + F.linear(h, e[:8]) + 0.5 * F.embedding(ids, e), mask

    def s2(w, inp):
        h, mask = inp
        return F.linear(h * mask.unsqueeze(-1).to(h.dtype), w["emb.weight"])

    return [s0, s1, s2]


def seq_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def tied_batches(n=10, bs=4, seq=5, vocab=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        mask = (torch.rand(bs, seq, generator=g) > 0.2).long()
        out.append(((ids, mask), torch.randint(0, vocab, (bs, seq), generator=g)))
    return out


def make_tied(seed=0):
    torch.manual_seed(seed)
    return TiedNet().double()


def test_tied_model_structure_and_one_optimizer_state():
    model = make_tied()
    batches = tied_batches()
    pipe = Pipeline(model, split_points=["mid", "head"], weights="stash", optimizer=sgd, loss_fn=seq_loss,
                    example_inputs=batches[0][0])
    assert pipe.num_stages == 3 and pipe.spec.split_points == ("mid", "head") and pipe.delays == [4, 2, 0]
    owned = [{id(p) for g in o.param_groups for p in g["params"]} if o else set() for o in pipe.optimizers]
    assert id(model.emb.weight) in owned[0] and all(id(model.emb.weight) not in o for o in owned[1:])
    assert sum(len(o) for o in owned) == len(list(model.parameters()))  # every parameter in exactly one optimizer
    assert pipe.parameter_bytes() == sum(p.numel() * 8 for p in model.parameters())


@pytest.mark.parametrize("as_dict", [False, True])
def test_tied_model_sync_equals_plain_pytorch(as_dict):
    model, batches = make_tied(), tied_batches()
    plain = copy.deepcopy(model)
    call = (lambda x: {"ids": x[0], "mask": x[1]}) if as_dict else (lambda x: x)
    pipe = Pipeline(model, split_points=["mid", "head"], weights="sync", optimizer=sgd, loss_fn=seq_loss,
                    example_inputs=call(batches[0][0]))
    losses = [pipe.step(call(x), y).losses for x, y in batches]
    opt = sgd(list(plain.parameters()))
    for (x, y), got in zip(batches, losses):
        opt.zero_grad()
        loss = seq_loss(plain(*x), y)
        loss.backward()
        opt.step()
        assert list(got.values())[0].item() == pytest.approx(loss.item(), abs=1e-12)
    assert max_diff(model, plain) < 1e-12


@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
def test_tied_model_stash_equals_handwritten_delayed_reference(schedule):
    model, batches = make_tied(), tied_batches()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    pipe = Pipeline(model, split_points=["mid", "head"], weights="stash", optimizer=sgd, loss_fn=seq_loss,
                    schedule=schedule, example_inputs=batches[0][0])
    for x, y in batches:
        pipe.step(x, y)
    pipe.flush()
    want = delayed_reference(init, TIED_USES, tied_stage_fns(), pipe.delays, batches, seq_loss, sgd)
    assert_params(model, want, atol=1e-12)
    # the test has teeth: latest and a pipeline that ignored the tied gradient part differ
    latest = make_tied()
    p2 = Pipeline(latest, split_points=["mid", "head"], weights="latest", optimizer=sgd, loss_fn=seq_loss,
                  schedule=schedule, example_inputs=batches[0][0])
    for x, y in batches:
        p2.step(x, y)
    p2.flush()
    assert max_diff(model, latest) > 1e-6


def test_tied_model_ema_runs_its_reconstruction_for_the_tied_user():
    batches = tied_batches()
    models = {}
    for w in ("stash", "ema", "latest"):
        models[w] = make_tied()
        pipe = Pipeline(models[w], split_points=["mid", "head"], weights=w, optimizer=sgd, loss_fn=seq_loss,
                        example_inputs=batches[0][0])
        for x, y in batches:
            pipe.step(x, y)
        pipe.flush()
        assert not any(s._tied for s in pipe.stages[:1])  # every tied gradient part consumed
    assert max_diff(models["ema"], models["stash"]) > 1e-8
    assert max_diff(models["ema"], models["latest"]) > 1e-8


def test_stages_k_splits_automatically_and_bad_requests_raise_plan_errors():
    model, batches = make_tied(), tied_batches()
    pipe = Pipeline(model, stages=2, weights="stash", optimizer=sgd, loss_fn=seq_loss, example_inputs=batches[0][0])
    assert pipe.num_stages == 2 and len(pipe.spec.split_points) == 1
    pipe.step(*batches[0])
    with pytest.raises(LayerpipeError, match="missing a required argument"):
        pipe.step((batches[1][0][0],), batches[1][1])  # checked before the microbatch enters
    with pytest.raises(LayerpipeError, match="tensor, a tuple"):
        pipe.step([1], batches[1][1])
    pipe.step(*batches[1])
    pipe.flush()
    with pytest.raises(PlanError, match="example_inputs"):
        Pipeline(make_tied(), split_points=["mid"])
    with pytest.raises(PlanError, match="not both"):
        Pipeline(make_tied(), stages=2, split_points=["mid"], example_inputs=batches[0][0])
    with pytest.raises(PlanError):
        Pipeline(make_tied(), split_points=["nope"], example_inputs=batches[0][0])
    with pytest.raises(PlanError):
        Pipeline(make_tied(), stages=[1, 2], example_inputs=batches[0][0])
    with pytest.raises(LayerpipeError, match="tensor, a tuple"):
        Pipeline(make_tied(), split_points=["mid"], example_inputs=[1, 2])
    with pytest.raises(LayerpipeError, match="mixed_precision"):
        Pipeline(make_tied(), split_points=["mid"], example_inputs=batches[0][0], mixed_precision="fp8")


def test_sequential_with_split_points_matches_slices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
               for _ in range(8)]
    a = Pipeline(model, split_points=["2", "4"], weights="stash", optimizer=sgd, example_inputs=batches[0][0])
    b = Pipeline(twin, stages=[2, 2, 1], weights="stash", optimizer=sgd)
    for x, y in batches:
        a.step(x, y)
        b.step(x, y)
    a.flush()
    b.flush()
    assert max_diff(model, twin) < 1e-12


# -- mixed precision and activation checkpointing keep the strategies exact --------------------
class CkptBlock(nn.Module):
    def __init__(self, d, mode="nonreentrant"):
        super().__init__()
        self.lin1, self.lin2, self.mode = nn.Linear(d, d), nn.Linear(d, d), mode

    def _f(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))

    def forward(self, x):
        if self.mode is None:
            return x + self._f(x)
        return x + checkpoint(self._f, x, use_reentrant=self.mode == "reentrant")


def make_ckpt_model(mode="nonreentrant", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), CkptBlock(16, mode), CkptBlock(16, mode), nn.Linear(16, 4))


def ckpt_batches(n=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def run_seq(model, weights, batches, **kw):
    pipe = Pipeline(model, stages=[1, 1, 1, 1], weights=weights, optimizer=sgd, loss_fn=F.cross_entropy, **kw)
    for x, y in batches:
        pipe.step(x, y)
    pipe.flush()
    return pipe


def seq_reference(model, delays, batches, autocast):
    """The delayed reference for an nn.Sequential of one layer per stage, checkpointing off
    (a recompute is the same computation)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, CkptBlock):
            m.mode = None
    layers = [ref[k : k + 1] for k in range(len(ref))]
    uses = [[n for n, _ in s.named_parameters()] for s in layers]
    fns = [lambda w, h, s=s: functional_call(s, w, (h,)) for s in layers]
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    return delayed_reference(init, uses, fns, delays, batches, F.cross_entropy, sgd, autocast)


@pytest.mark.parametrize("mode", ["nonreentrant", "reentrant"])
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), (None, None)])
def test_checkpoint_and_autocast_stash_equals_delayed_reference(precision, dtype, mode, backward_path):
    batches = ckpt_batches()
    model = make_ckpt_model(mode)
    init = copy.deepcopy(model)
    pipe = run_seq(model, "stash", batches, mixed_precision=precision)
    want = seq_reference(init, pipe.delays, batches, dtype)
    assert_params(model, want, atol=1e-6)
    # and not by accident: the backward really runs on the strategy's weights
    latest = run_seq(make_ckpt_model(mode), "latest", batches, mixed_precision=precision)
    assert max_diff(latest.model, model) > 1e-4


def test_autocast_without_checkpoint_stash_equals_reference_and_ema_uses_its_reconstruction(backward_path):
    batches = ckpt_batches()
    got = {}
    for w in ("stash", "ema", "latest"):
        got[w] = run_seq(make_ckpt_model(mode=None), w, batches, mixed_precision="bf16").model
    want = seq_reference(make_ckpt_model(mode=None), [6, 4, 2, 0], batches, torch.bfloat16)
    assert_params(got["stash"], want, atol=1e-6)
    # the cast copies autocast saved are replaced by the strategy's version, cast the same way:
    # were they kept, all three would train exactly like stash
    assert max_diff(got["ema"], got["stash"]) > 1e-4
    assert max_diff(got["ema"], got["latest"]) > 1e-4
    assert max_diff(got["latest"], got["stash"]) > 1e-4


def test_checkpoint_with_autocast_ema_uses_its_reconstruction():
    batches = ckpt_batches()
    got = {w: run_seq(make_ckpt_model(), w, batches, mixed_precision="bf16").model for w in ("stash", "ema", "latest")}
    assert max_diff(got["ema"], got["stash"]) > 1e-4
    assert max_diff(got["ema"], got["latest"]) > 1e-4


def test_model_with_its_own_autocast_matches_reference():
    class OwnAutocast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x)

    batches = ckpt_batches()
    torch.manual_seed(0)
    layers = [OwnAutocast(nn.Linear(8, 16)), nn.Tanh(), OwnAutocast(nn.Linear(16, 4))]
    model = nn.Sequential(*layers)
    init = copy.deepcopy(model)
    pipe = Pipeline(model, stages=[1, 1, 1], weights="stash", optimizer=sgd, loss_fn=F.cross_entropy)
    for x, y in batches:
        pipe.step(x, y)
    pipe.flush()
    ref_layers = [init[k : k + 1] for k in range(3)]
    want = delayed_reference({n: p.detach().clone() for n, p in init.named_parameters()},
                             [[n for n, _ in s.named_parameters()] for s in ref_layers],
                             [lambda w, h, s=s: functional_call(s, w, (h,)) for s in ref_layers],
                             pipe.delays, batches, F.cross_entropy, sgd)
    assert_params(model, want, atol=1e-6)


# -- training controls --------------------------------------------------------------------------
def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def mlp_batches(n=12, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def test_clip_grad_norm_per_stage_equals_plain_pytorch():
    batches = mlp_batches()
    model = make_mlp()
    plain, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    run = Pipeline(model, stages=[2, 3], weights="sync", optimizer=sgd, clip_grad_norm=0.05)
    for x, y in batches:
        run.step(x, y)
    groups = [list(plain[0:2].parameters()), list(plain[2:5].parameters())]
    opt = sgd(list(plain.parameters()))
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        for g in groups:
            torch.nn.utils.clip_grad_norm_(g, 0.05)
        opt.step()
    assert max_diff(model, plain) < 1e-12
    Pipeline(unclipped, stages=[2, 3], weights="sync", optimizer=sgd).step(*batches[0])
    assert max_diff(model, unclipped) > 1e-4  # the clipping was active


def test_lr_scheduler_per_stage_equals_plain_pytorch():
    batches = mlp_batches()
    model = make_mlp()
    plain = copy.deepcopy(model)

    def sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    pipe = Pipeline(model, stages=[2, 3], weights="sync", optimizer=sgd, lr_scheduler=sched)
    for x, y in batches:
        pipe.step(x, y)
    opt = sgd(list(plain.parameters()))
    s = sched(opt)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
        s.step()
    assert max_diff(model, plain) < 1e-12
    assert [o.param_groups[0]["lr"] for o in pipe.optimizers] == [0.1 * 0.5**4] * 2
    assert all(sc is not None for sc in pipe.lr_schedulers)
    state = pipe.state_dict()
    assert all("scheduler" in st for st in state["stages"])


def test_lr_scheduler_steps_after_every_update_of_a_delayed_stage():
    batches = mlp_batches(n=5)
    pipe = Pipeline(make_mlp(), stages=[2, 3], weights="stash", optimizer=sgd,
                    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1 + n)))
    for x, y in batches:
        pipe.step(x, y)
    # after ticks 0-4: stage 0 (delay 2) has updated at ticks 2, 3, 4; stage 1 (delay 0) at 1-4
    assert [o.param_groups[0]["lr"] for o in pipe.optimizers] == pytest.approx([0.1 / 4, 0.1 / 5])
    pipe.flush()
    assert [o.param_groups[0]["lr"] for o in pipe.optimizers] == pytest.approx([0.1 / 6, 0.1 / 6])


# -- Hugging Face GPT-2 --------------------------------------------------------------------------
def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _gpt2_batches(n=6, bs=4, seq=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (bs, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # a left-padded sequence
        out.append(({"input_ids": ids, "attention_mask": mask, "use_cache": False}, ids))
    return out


def lm_loss(out, ids):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def adam(params):
    return torch.optim.Adam(params, lr=3e-3)


def test_hugging_face_gpt2_sync_equals_plain_pytorch():
    model, batches = _gpt2(), _gpt2_batches()
    plain = copy.deepcopy(model)
    pipe = Pipeline(model, split_points=["transformer.h.2"], weights="sync", optimizer=adam, loss_fn=lm_loss,
                    example_inputs=batches[0][0])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert pipe.split.tied_params()  # the tied embedding: read by both stages, owned by stage 0
    got = [pipe.step(x, y).losses for x, y in batches]
    opt = adam(list(plain.parameters()))
    for (x, y), g in zip(batches, got):
        opt.zero_grad()
        loss = lm_loss(plain(**x), y)
        loss.backward()
        opt.step()
        assert list(g.values())[0].item() == pytest.approx(loss.item(), abs=1e-6)
    assert max_diff(model, plain) < 1e-6


def test_hugging_face_gpt2_stash_equals_delayed_reference():
    from layerpipe.split import split_model

    model, batches = _gpt2(), _gpt2_batches()
    twin = copy.deepcopy(model)
    pipe = Pipeline(model, split_points=["transformer.h.2"], weights="stash", optimizer=adam, loss_fn=lm_loss,
                    example_inputs=batches[0][0])
    for x, y in batches:
        pipe.step(x, y)
    pipe.flush()
    # the reference runs the twin's stages functionally on each microbatch's weight point
    split = split_model(twin, split_points=["transformer.h.2"], example_kwargs=batches[0][0])
    canon = {id(p): n for n, p in twin.named_parameters()}
    local = [{n: canon[id(p)] for n, p in s.named_parameters()} for s in split.stages]
    uses = [sorted(set(m.values())) for m in local]

    def stage_fn(k):
        def fn(w, h):
            ws = {n: w[c] for n, c in local[k].items()}
            return functional_call(split.stages[k], ws, (), h) if k == 0 else functional_call(split.stages[k], ws, h)
        return fn

    init = {n: p.detach().clone() for n, p in twin.named_parameters()}
    want = delayed_reference(init, uses, [stage_fn(0), stage_fn(1)], pipe.delays, batches, lm_loss, adam)
    assert "transformer.wte.weight" in uses[0] and "transformer.wte.weight" in uses[1]
    assert_params(model, want, atol=2e-6, rtol=1e-5)
    assert max_diff(model, twin) > 1e-3  # it trained
