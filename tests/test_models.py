"""Model zoo: every model builds as an nn.Sequential of >= 4 blocks, runs forward and
backward, and has the documented shapes; spiking and causal details checked directly."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from layerpipe.data import DATASET_NAMES, loss_fn
from layerpipe.errors import PlanError
from layerpipe.models import MODEL_NAMES, build_model, default_dataset, example_input
from layerpipe.models.snn import LIF, spike

OUTPUT_SHAPES = {"mlp": (2, 10), "cnn1d": (2, 10), "resnet18": (2, 100), "snn": (2, 10), "gpt": (2, 128, 256)}


def test_model_names_are_the_contract():
    assert MODEL_NAMES == ("mlp", "cnn1d", "resnet18", "snn", "gpt")
    assert set(OUTPUT_SHAPES) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert isinstance(model, nn.Sequential)
    assert len(model) >= 4
    # every block holds weights: a one-block stage never has an empty optimizer
    for i, block in enumerate(model):
        assert any(True for _ in block.parameters()), f"block {i} of {name} has no parameters"
    x = example_input(name, batch_size=2)
    out = model(x)
    assert tuple(out.shape) == OUTPUT_SHAPES[name]
    task = "language" if name == "gpt" else "classification"
    target = torch.randint(0, out.shape[-1], out.shape[:-1])
    loss_fn(task)(out, target).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all()
    assert default_dataset(name) in DATASET_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_blocks_chain_as_stages(name):
    # a split into contiguous stages computes exactly what the whole model does
    model = build_model(name).eval()
    x = example_input(name, batch_size=2)
    with torch.no_grad():
        h = x
        for block in model:
            h = block(h)
        assert torch.equal(h, model(x))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_float64(name):
    model = build_model(name).double()
    x = example_input(name, 2)
    x = x if name == "gpt" else x.double()
    assert model(x).dtype == torch.float64


@pytest.mark.parametrize("name", ["cnn1d", "snn", "gpt", "mlp"])
def test_bfloat16_forward(name):
    model = build_model(name).to(torch.bfloat16)
    x = example_input(name, 2)
    x = x if name == "gpt" else x.to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_block_counts_and_sizes():
    counts = {name: len(build_model(name)) for name in MODEL_NAMES}
    assert counts == {"mlp": 5, "cnn1d": 5, "resnet18": 10, "snn": 5, "gpt": 6}


def test_resnet18_has_the_cifar_parameter_count():
    n100 = sum(p.numel() for p in build_model("resnet18").parameters())
    n10 = sum(p.numel() for p in build_model("resnet18", num_classes=10).parameters())
    assert n10 == 11_173_962  # the well-known CIFAR-10 ResNet-18 size
    assert n100 == n10 + 90 * 512 + 90
    assert abs(n100 - 11.2e6) < 0.1e6


def test_resnet18_stem_is_3x3_without_maxpool():
    model = build_model("resnet18", num_classes=10)
    assert model[0][0].kernel_size == (3, 3) and model[0][0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_for_digits_and_cnn_with_channel_axis():
    mlp = build_model("mlp", input_shape=(64,), num_classes=10)
    assert mlp(torch.randn(3, 64)).shape == (3, 10)
    cnn = build_model("cnn1d")
    x = torch.randn(3, 40)
    assert torch.equal(cnn(x), cnn(x.unsqueeze(1)))  # (B, 40) and (B, 1, 40) are the same input
    two_channel = build_model("cnn1d", input_shape=(2, 40), num_classes=4)
    assert two_channel(torch.randn(3, 2, 40)).shape == (3, 4)


def test_builder_options_pass_through():
    assert len(build_model("cnn1d", channels=(8, 8, 8, 8, 8))) == 6
    assert len(build_model("gpt", n_layer=2, d_model=32, n_head=2)) == 4
    gpt = build_model("gpt", input_shape=(16,), n_layer=1, d_model=32, n_head=2)
    assert gpt(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)
    assert len(build_model("mlp", hidden=(32, 32, 32))) == 4


def test_unknown_model_and_option_raise_plan_error():
    with pytest.raises(PlanError, match=r"unknown model 'vgg'.*mlp, cnn1d, resnet18, snn, gpt"):
        build_model("vgg")
    with pytest.raises(PlanError, match="unknown model"):
        example_input("vgg")
    with pytest.raises(PlanError, match="unknown model"):
        default_dataset("vgg")
    with pytest.raises(PlanError, match="no option depth"):
        build_model("cnn1d", depth=3)
    with pytest.raises(PlanError, match=r"\(L,\) or \(C, L\)"):
        build_model("cnn1d", input_shape=(3, 32, 32))


def test_example_input_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = example_input("cnn1d", 4), example_input("cnn1d", 4)
    assert torch.equal(a, b) and a.shape == (4, 40) and a.dtype == torch.float32
    assert torch.equal(state, torch.get_rng_state())
    ids = example_input("gpt", 3)
    assert ids.dtype == torch.int64 and ids.shape == (3, 128) and 0 <= ids.min() and ids.max() < 256
    assert example_input("resnet18", 2).shape == (2, 3, 32, 32)


# ---- spiking network ------------------------------------------------------------------


def test_spike_is_a_step_with_the_arctan_surrogate_gradient():
    v = torch.tensor([-1.0, -0.1, 0.0, 0.2, 3.0], requires_grad=True)
    s = spike(v, alpha=2.0)
    assert s.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    s.sum().backward()
    expected = 1.0 / (1 + (math.pi * v.detach()) ** 2)  # (alpha / 2) / (1 + (pi / 2 alpha v)^2), alpha = 2
    torch.testing.assert_close(v.grad, expected)


def test_spike_surrogate_gradient_matches_finite_difference_of_arctan():
    # the surrogate is the derivative of the smooth step atan(pi/2 alpha v)/pi + 1/2
    v = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    spike(v, alpha=3.0).sum().backward()
    smooth = lambda u: torch.atan(math.pi / 2 * 3.0 * u) / math.pi  # noqa: E731
    eps = 1e-6
    fd = (smooth(v.detach() + eps) - smooth(v.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(v.grad, fd, rtol=1e-5, atol=1e-8)


def test_lif_integrates_fires_and_resets():
    lif = LIF(beta=0.5, threshold=1.0)
    current = torch.tensor([0.6, 0.6, 0.6, 0.0, 2.0]).view(5, 1)
    # v: 0.6, 0.9, 1.05 -> spike, reset to 0.05, then 0.025, then 2.0125 -> spike
    assert lif(current).view(-1).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]


def test_snn_gradient_flows_through_the_surrogate_to_the_first_layer():
    torch.manual_seed(0)
    model = build_model("snn")
    x = example_input("snn", 8)
    spikes = model[0](x)
    assert spikes.shape == (4, 8, 32, 40)  # (T, B, C, L)
    assert set(torch.unique(spikes).tolist()) <= {0.0, 1.0}
    F.cross_entropy(model(x), torch.arange(8) % 10).backward()
    encoder_grad = model[0].conv[0].weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["cnn1d", "snn"])
def test_norm_option_adds_one_batchnorm_per_convolution(name):
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    with_norm, without = build_model(name), build_model(name, norm=False)
    assert count(with_norm, nn.BatchNorm1d) == count(with_norm, nn.Conv1d) == 4
    assert count(without, nn.BatchNorm1d) == 0 and count(without, nn.Conv1d) == 4
    assert without(example_input(name, 2)).shape == (2, 10)


def test_snn_time_steps_option():
    model = build_model("snn", time_steps=3)
    assert model[0](example_input("snn", 2)).shape[0] == 3
    assert model(example_input("snn", 2)).shape == (2, 10)


def test_snn_works_under_functional_call():
    model = build_model("snn")
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (example_input("snn", 2),))
    out.sum().backward()
    assert params["0.conv.0.weight"].grad is not None


# ---- transformer ------------------------------------------------------------------------


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model("gpt", n_layer=2, d_model=64, n_head=4).eval()
    x = torch.randint(0, 256, (2, 32))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 7) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-4


def test_gpt_rejects_too_long_sequences():
    model = build_model("gpt", input_shape=(16,), n_layer=1, d_model=32, n_head=2)
    with pytest.raises(PlanError, match="block size 16"):
        model(torch.randint(0, 256, (1, 17)))


def test_building_does_not_touch_python_or_numpy_rng():
    r, n = random.getstate(), np.random.get_state()
    for name in MODEL_NAMES:
        build_model(name)
    assert random.getstate() == r
    assert np.array_equal(np.random.get_state()[1], n[1])
