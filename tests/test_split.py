"""The model splitter (layerpipe.split), each check against plain PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpipe.errors import LayerpipeError, PlanError
from layerpipe.plan.costs import param_costs
from layerpipe.plan.layers import module_layers
from layerpipe.plan.partition import resolve_partition
from layerpipe.split import run_chained, split_model


def _plain_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


# -- models -----------------------------------------------------------------------------------
class SkipNet(nn.Module):
    """stem -> three blocks -> head, and the stem's output added again at the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        h = s
        for block in self.blocks:
            h = h + block(h)
        return self.head(h + s)


class MaskedLM(nn.Module):
    """Token embedding, two blocks that use the attention mask, a head: keyword inputs."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        for layer in self.layers:
            h = h + torch.tanh(layer(h)) * mask
        return self.head(h)


class TiedLM(nn.Module):
    """Embedding and output projection share one weight."""

    def __init__(self, vocab: int = 10, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.embed(ids)))


# -- (1) skip connection across a boundary ----------------------------------------------------------
def test_skip_connection_forward_and_backward_match_plain_pytorch():
    torch.manual_seed(0)
    model, x = SkipNet(), torch.randn(5, 6)
    split = split_model(model, split_points=["blocks.1", "blocks.2"], example_args=(x,))
    assert split.num_stages == 3 and split.split_points == ["blocks.1", "blocks.2"]
    # the stem's output is made in stage 0, used in stage 2: it travels through stage 1
    assert len(split.boundaries[0]) == 2 and len(split.boundaries[1]) == 2
    assert split.boundaries[0].names[0] == split.boundaries[1].names[0]

    out = split.stages[0](x)
    assert isinstance(out, tuple) and all(isinstance(v, torch.Tensor) for v in out)
    out = split.stages[1](*out)
    out = split.stages[2](*out)
    assert torch.equal(out, model(x))

    y = torch.randint(0, 3, (5,))
    result = run_chained(split, (x,), {}, lambda o: F.cross_entropy(o, y))
    want = _plain_grads(model, F.cross_entropy(model(x), y))
    assert torch.equal(result.loss, F.cross_entropy(model(x), y).detach())
    _assert_grads_equal(result.summed_grads(), want)
    assert not split.tied_params()


def test_boundary_specs_from_one_example_forward():
    torch.manual_seed(0)
    model, x = SkipNet(), torch.randn(5, 6)
    split = split_model(model, split_points=["blocks.1", "blocks.2"], example_args=(x,))
    assert split.boundary_specs is not None
    for specs, boundary in zip(split.boundary_specs, split.boundaries):
        assert tuple(s.name for s in specs) == boundary.names
        for s in specs:
            assert s.shape == (5, 8) and s.per_sample_shape == (8,) and s.batched
            assert s.dtype == torch.float32 and s.requires_grad
    again = split.describe_boundaries(torch.randn(7, 6))
    assert again[0][0].shape == (7, 8)


# -- (2) keyword inputs -------------------------------------------------------------------------
def test_keyword_inputs_input_ids_and_attention_mask():
    torch.manual_seed(0)
    model = MaskedLM()
    ids = torch.randint(0, 11, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    split = split_model(model, split_points=["layers.1"], example_kwargs=inputs)
    assert split.method == "fx"
    # boundary 0: the hidden state (needs a gradient) and the float mask made from
    # attention_mask in stage 0 (needs none)
    specs = split.boundary_specs[0]
    assert [(s.shape, s.requires_grad) for s in specs] == [((3, 7, 1), False), ((3, 7, 8), True)]
    out = split.stages[1](*split.stages[0](**inputs))
    assert torch.equal(out, model(**inputs))

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    result = run_chained(split, (), inputs, loss_fn)
    _assert_grads_equal(result.summed_grads(), _plain_grads(model, loss_fn(model(**inputs))))


# -- (3) tied parameters ----------------------------------------------------------------------------
def test_tied_parameters_mapping_and_summed_gradients():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 10, (4, 5))
    split = split_model(model, split_points=["body.2"], example_args=(ids,))
    assert split.param_users["embed.weight"] == [0, 1]
    assert split.owner("embed.weight") == 0
    assert split.tied_params() == {"embed.weight": [0, 1]}
    assert split.param_users["body.2.weight"] == [1] and split.owner("body.2.weight") == 1
    assert "out.weight" not in split.param_users  # one entry per tensor, under its first name
    assert [n for n, _ in split.owned_parameters(1)] == ["body.2.weight", "body.2.bias"]

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    result = run_chained(split, (ids,), {}, loss_fn)
    # each user contributes its own part; only their sum is the model's gradient
    g0, g1 = result.stage_grads[0]["embed.weight"], result.stage_grads[1]["embed.weight"]
    assert g0.abs().sum() > 0 and g1.abs().sum() > 0
    _assert_grads_equal(result.summed_grads(), _plain_grads(model, loss_fn(model(ids))))


# -- (4) shared parameters and buffers ---------------------------------------------------------------
def test_stages_share_the_models_parameters_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 4)
    split = split_model(model, split_points=["2"], example_args=(x,))
    own = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for stage in split.stages:
        assert all(id(t) in own for t in [*stage.parameters(), *stage.buffers()])
    with torch.no_grad():
        split.stages[1].graph_module.get_submodule("3").weight.fill_(0.5)
    assert torch.all(model[3].weight == 0.5)
    # an optimizer over the stages' parameters trains the model in place
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD([p for s in split.stages for p in s.parameters()], lr=0.1)
    split(x).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    # BatchNorm statistics of the model are updated by the stages, and not by the split itself
    assert model[1].num_batches_tracked.item() == 1
    assert split.buffer_users["1.running_mean"] == [0]


# -- Sequential: the same as slicing it -------------------------------------------------------------
def test_sequential_splits_like_slicing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3), nn.Softmax(-1))
    x = torch.randn(4, 5)
    split = split_model(model, split_points=["2", "4"])
    h = x
    for stage, (a, b) in zip(split.stages, [(0, 2), (2, 4), (4, 6)]):
        want = model[a:b](h)
        got = stage(h) if stage.is_first else stage(*h_tuple)
        got_t = got[0] if isinstance(got, tuple) else got
        assert torch.equal(got_t, want)
        assert len(got) == 1 if isinstance(got, tuple) else stage.is_last
        h, h_tuple = want, (want,)
    for k in (2, 3, 4):
        sizes = resolve_partition(len(model), k, costs=param_costs(module_layers(model)))
        auto = split_model(model, num_stages=k)
        starts = [str(sum(sizes[:j])) for j in range(1, k)]
        assert auto.split_points == starts


def test_num_stages_balances_a_non_sequential_model():
    torch.manual_seed(0)
    model, x = SkipNet(), torch.randn(2, 6)
    split = split_model(model, num_stages=2, example_args=(x,))
    assert split.num_stages == 2 and split.split_points == ["blocks.1"]
    assert torch.equal(split(x), model(x))


# -- (5) clear errors -------------------------------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on tensor values: neither tracer can keep it
            return self.b(self.a(x))
        return self.a(x)


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.attn(h, h, h)[0]


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (DataDependent, dict(split_points=["b"], example_args=(torch.randn(2, 3),)), "cannot capture DataDependent"),
        (SkipNet, dict(split_points=["blocks.7"]), "no submodule of that name"),
        (SkipNet, dict(split_points=["stem"]), "stage 0 would be empty"),
        (SkipNet, dict(split_points=["blocks.1", "blocks.1.0"]), "same operation"),
        (SkipNet, dict(num_stages=40), "40 stages"),
        (SkipNet, dict(), "either split_points or num_stages"),
        (SkipNet, dict(split_points="head"), "list of submodule names"),
        (WithAttention, dict(split_points=["attn.out_proj"]), "inside 'attn'"),
        (lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU()), dict(num_stages=3), "only 2 layers"),
    ],
)
def test_unsupported_models_and_split_points_raise_one_plan_error(make, kwargs, match):
    with pytest.raises(PlanError, match=match) as info:
        split_model(make(), **kwargs)
    assert isinstance(info.value, LayerpipeError)
    assert "\n" not in str(info.value)


# -- (6) Hugging Face GPT-2 ------------------------------------------------------------------------
def test_hugging_face_gpt2_split_matches_logits_gradients_and_ties():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    split = split_model(model, split_points=["transformer.h.2"], example_kwargs=inputs)
    assert split.num_stages == 2
    # the boundary carries the hidden state and the attention mask GPT-2 built from
    # attention_mask; shape symbols are read from them instead of sending attention_mask
    specs = split.boundary_specs[0]
    assert [(s.per_sample_shape, s.dtype, s.requires_grad) for s in specs] == [
        ((1, 12, 12), torch.bool, False),
        ((12, 64), torch.float32, True),
    ]
    assert split.tied_params() == {"transformer.wte.weight": [0, 1]}
    assert split.owner("transformer.wte.weight") == 0
    names = dict(model.named_parameters(remove_duplicate=False))
    assert names["lm_head.weight"] is names["transformer.wte.weight"]

    out = split.stages[1](*split.stages[0](**inputs))
    want = model(**inputs)
    assert type(out) is type(want)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    # other shapes than the example's still work (exported with dynamic shapes)
    short = {"input_ids": ids[:2, :5], "attention_mask": mask[:2, :5], "use_cache": False}
    torch.testing.assert_close(split(**short).logits, model(**short).logits)

    def loss_fn(o) -> torch.Tensor:
        return F.cross_entropy(o.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    result = run_chained(split, (), inputs, loss_fn)
    _assert_grads_equal(result.summed_grads(), _plain_grads(model, loss_fn(model(**inputs))))
