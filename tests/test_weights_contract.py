"""The contract every registered weight strategy keeps, parametrised over the registry: a new
strategy (one file under `weights/` with `@register_strategy`) is covered without editing a test."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerpipe import Pipeline
from layerpipe.weights import make_strategy, memory_formulas, strategy_class, strategy_help, strategy_names

NAMES = strategy_names()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 6, generator=g, dtype=torch.float64)
    return [(xb, (xb[:, 0] > 0).long() + (xb[:, 1] > 0).long()) for xb in x]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def test_the_registry_lists_the_main_strategies_first():
    assert NAMES[:3] == ["stash", "ema", "latest"]


@pytest.mark.parametrize("name", NAMES)
def test_backward_weights_of_the_current_version_are_the_live_weights(name):
    p = torch.randn(4, 3, dtype=torch.float64)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    s = make_strategy(name, [p], delay=3, optimizer=opt)
    for _ in range(4):
        version = s.record_forward()
        assert s.updates_since(version) == 0
        torch.testing.assert_close(s.backward_weights(version)[0], p, rtol=0, atol=0)
        s.release(version)
        p.grad = torch.randn_like(p)
        s.before_update()
        opt.step()
        s.after_update()


@pytest.mark.parametrize("name", NAMES)
def test_update_passes_do_what_the_update_hooks_do(name):
    """A fused update runs `update_passes()` around the step instead of the hooks: the
    backward weights of every version in flight must come out the same, bit for bit. A
    strategy that states no passes (None) must have done nothing: the hooks then run."""
    from layerpipe.weights.base import run_pass

    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, 3, generator=g)
    runs = []
    for passes in (False, True):
        p = start.clone()
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        s = make_strategy(name, [p], delay=3, optimizer=opt)
        versions = []
        for t in range(6):
            versions.append(s.record_forward())
            if t >= 3:
                s.release(versions[t - 3])
            p.grad = grads[t].double()
            version = s.version
            stated = s.update_passes() if passes else None
            assert s.version == (version if stated is None else version + 1)
            if stated is None:
                s.before_update()
            else:
                run_pass(stated[0], s.params)
            opt.step()
            if stated is None:
                s.after_update()
            else:
                run_pass(stated[1], s.params)
        runs.append([s.backward_weights(v)[0].clone() for v in versions[3:]] + [p.clone()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_strategy_that_changes_a_hook_does_not_inherit_its_parents_passes():
    from layerpipe.weights.stash import Stash

    class Counting(Stash):  # a hook with work of its own that no pass states
        def after_update(self) -> None:
            super().after_update()
            self.counted = getattr(self, "counted", 0) + 1

    p = torch.randn(3)
    assert Counting([p], 2, None).update_passes() is None
    assert Stash([p], 2, None).update_passes() == (None, None)  # nothing pending: no copy


@pytest.mark.parametrize("name", NAMES)
def test_trains_through_the_pipeline_and_counts_its_memory_honestly(name):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    pipe = Pipeline(model, stages=[2, 2, 1], weights=name, optimizer=_sgd)
    losses, peak = [], 0
    for x, y in _batches(20):
        losses += [float(v) for v in pipe.step(x, y).losses.values()]
        peak = max(peak, pipe.weight_history_bytes())
    for info in pipe.flush():
        losses += [float(v) for v in info.losses.values()]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the planner's memory formula bounds what the strategy holds (stage by stage)
    versions = memory_formulas([name])[name]
    bound = sum(versions(s.delay) * s.parameter_bytes() for s in pipe.stages)
    if name != "probe":  # the probe also keeps shadow estimators: a measurement tool
        assert peak <= bound, (peak, bound)
    assert versions(0) == 0 and pipe.stages[-1].strategy.history_bytes() == 0  # no delay, no history


@pytest.mark.parametrize("name", NAMES)
def test_the_two_backward_paths_give_the_same_numbers(name, monkeypatch):
    """A stage swaps the past version's storage into its parameters for the backward, or (where
    torch cannot swap storages) hands it to autograd through the saved-tensor hooks (both
    checked against the references in test_engine.py): bit for bit the same training, for
    every strategy."""
    import layerpipe.engine.stage as stage_module

    default = stage_module.swap_storages

    def train(swap: bool) -> tuple[list[float], list[torch.Tensor], list[bool]]:
        monkeypatch.setattr(stage_module, "swap_storages", default if swap else None)
        model = _model()
        pipe = Pipeline(model, stages=[2, 2, 1], weights=name, optimizer=_sgd)
        losses = []
        for x, y in _batches(16):
            losses += [float(v) for v in pipe.step(x, y).losses.values()]
        for info in pipe.flush():
            losses += [float(v) for v in info.losses.values()]
        return losses, [p.detach().clone() for p in model.parameters()], [s.swaps for s in pipe.stages]

    swap_losses, swap_params, swaps = train(True)
    hook_losses, hook_params, no_swaps = train(False)
    # the last stage has d = 0; a backward on the live weights (`latest`) needs neither path
    delayed = not strategy_class(name).live_backward
    assert swaps == [delayed, delayed, False] and no_swaps == [False, False, False]
    assert swap_losses == hook_losses
    assert all(torch.equal(a, b) for a, b in zip(swap_params, hook_params))


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_resumes_to_the_same_weights(name):
    if not strategy_class(name).checkpointable:
        pytest.skip(f"{name} is a measurement tool")
    batches = _batches(24)
    model = _model()
    whole = Pipeline(model, stages=3, weights=name, optimizer=_sgd)
    for x, y in batches[:12]:
        whole.step(x, y)
    whole.flush()
    state = copy.deepcopy(whole.state_dict())
    resumed_model = copy.deepcopy(model)
    for x, y in batches[12:]:
        whole.step(x, y)
    whole.flush()
    resumed = Pipeline(resumed_model, stages=3, weights=name, optimizer=_sgd)
    resumed.load_state_dict(state)
    for x, y in batches[12:]:
        resumed.step(x, y)
    resumed.flush()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_is_in_the_help(name):
    assert f"{name}: " in strategy_help()


def test_an_unknown_option_is_one_clear_error():
    from layerpipe.errors import LayerpipeError

    p = torch.zeros(3)
    with pytest.raises(LayerpipeError, match="does not take option"):
        make_strategy("stash", [p], 2, None, alpha=0.5)
    assert make_strategy("ema", [p], 2, None, alpha=0.5).alpha == 0.5


def test_a_new_strategy_file_is_picked_up(tmp_path, monkeypatch):
    """One decorated class is all it takes: the registry, make_strategy, the help and the
    Pipeline see it."""
    from layerpipe.weights import WeightStrategy, register_strategy

    @register_strategy
    class Frozen(WeightStrategy):
        """always the weights of the first version (a test double)"""

        name = "test-frozen"

    try:
        assert "test-frozen" in strategy_names() and "test-frozen: always" in strategy_help()
        pipe = Pipeline(_model(), stages=2, weights="test-frozen", optimizer=_sgd)
        for x, y in _batches(3):
            pipe.step(x, y)
        pipe.flush()
    finally:
        from layerpipe.weights import registry

        registry._REGISTRY.pop("test-frozen")


def test_a_version_in_a_shared_buffer_is_copied_before_the_swap(monkeypatch):
    """A strategy (a user's) may hand the backward views into one flat buffer, which cannot be
    swapped in alone: the engine copies them first and trains exactly as with `stash`."""
    from layerpipe.weights.flat import FlatBuffer
    from layerpipe.weights.stash import Stash

    def train() -> tuple[list[float], list[torch.Tensor], list[bool]]:
        model = _model()
        pipe = Pipeline(model, stages=[2, 2, 1], weights="stash", optimizer=_sgd)
        losses = [float(v) for x, y in _batches(12) for v in pipe.step(x, y).losses.values()]
        return losses, [p.detach().clone() for p in model.parameters()], [s.swaps for s in pipe.stages]

    exact = train()

    def flat_before_update(self) -> None:
        if self._pending.get(self.version, 0) > 0 and self.version not in self._saved:
            buf = FlatBuffer(self.params)  # views of one shared tensor
            buf.copy_from(self.params)
            self._saved[self.version] = buf

    monkeypatch.setattr(Stash, "before_update", flat_before_update)
    flat = train()
    assert flat[2] == [True, True, False]  # the swap path ran
    assert flat[0] == exact[0] and all(torch.equal(a, b) for a, b in zip(flat[1], exact[1]))


def test_a_buffer_keeps_its_checked_swap_pairs_for_its_stage_only():
    """The per-parameter checks of a swap run once per strategy buffer: a stash buffer keeps
    (live storage, its own storage) pairs for the stage's current storages; a stage that
    re-indexes its parameters checks again, and training is the same either way."""
    from layerpipe.weights import BufferViews

    def train(reindex: bool) -> tuple[list[float], list[torch.Tensor], Pipeline]:
        model = _model()
        pipe = Pipeline(model, stages=[2, 2, 1], weights="stash", optimizer=_sgd)
        losses = []
        for i, (x, y) in enumerate(_batches(12)):
            if reindex and i == 6:
                for stage in pipe.stages:
                    stage._index_params()  # new tuples of live storages: the kept pairs go stale
            losses += [float(v) for v in pipe.step(x, y).losses.values()]
        return losses, [p.detach().clone() for p in model.parameters()], pipe

    plain, again = train(False), train(True)
    assert plain[0] == again[0] and all(torch.equal(a, b) for a, b in zip(plain[1], again[1]))
    for pipe in (plain[2], again[2]):
        stage = pipe.stages[0]
        buffers = list(stage.strategy._saved.values()) + stage.strategy._free
        assert buffers and all(type(b.views) is BufferViews for b in buffers)
        checked = [b for b in buffers if b.views.checked_for is stage._live_storages]
        assert checked  # the backward of the last ticks used kept pairs of the current tuple
        for b in checked:
            assert [theirs.data_ptr() for _, theirs in b.views.swap_pairs] == [t.data_ptr() for t in b.views]
            assert [live.data_ptr() for live, _ in b.views.swap_pairs] == [p.data_ptr() for p in stage.params]


def test_a_version_of_the_wrong_shape_is_refused(monkeypatch):
    """Swapping storages trusts shape and dtype: a strategy that breaks them gets one clear error."""
    from layerpipe.errors import LayerpipeError
    from layerpipe.weights.stash import Stash

    right = Stash.backward_weights
    def transposed(self, version):
        ws = right(self, version)
        return ws if ws is self.params else [w.t().contiguous() if w.ndim == 2 else w for w in ws]

    monkeypatch.setattr(Stash, "backward_weights", transposed)
    pipe = Pipeline(_model(), stages=[2, 2, 1], weights="stash", optimizer=_sgd)
    with pytest.raises(LayerpipeError, match="gave the backward a torch.float64 .* tensor for a torch.float64"):
        for x, y in _batches(6):
            pipe.step(x, y)
