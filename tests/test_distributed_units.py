"""The distributed runtime's parts that need no second process: the per-stage tick program,
environment parsing, backend choice, shape probing, argument checks, and a one-process world
(K = 1, the code path a single GPU takes) against the single-process engine."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpipe import Pipeline
from layerpipe.engine.distributed import FailureMonitor, StageFailure, World, boundary_specs, choose_backend
from layerpipe.engine.distributed.faults import parse_fault as _parse_fault
from layerpipe.plan import sequential_spec
from layerpipe.schedule import Timing
from layerpipe.training.engines import check_stage_count
from layerpipe.errors import DistributedError, LayerpipeError, PlanError


def simulate(timing: Timing, num_stages: int, n: int) -> list[tuple[int, str, int, int]]:
    """(tick, action, stage, microbatch) of every action the per-stage programs run."""
    out = []
    for k in range(num_stages):
        for t in range(timing.length(n)):
            i = timing.forward(k, t, n)
            if i is not None:
                out.append((t, "F", k, i))
            j = timing.backward(k, t, n)
            if j is not None:
                out.append((t, "B", k, j))
    return out


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
def test_stage_programs_follow_the_tick_schedule(num_stages, schedule):
    from layerpipe.plan import stage_delays

    delays = stage_delays(num_stages, schedule)
    timing = Timing(tuple(delays), False)
    n = 7
    actions = simulate(timing, num_stages, n)
    for t, kind, k, m in actions:  # method.md section 3: forward at m + k, backward at m + k + d_k
        assert t == (m + k if kind == "F" else m + k + delays[k])
    assert len(actions) == 2 * n * num_stages
    # every message is consumed no earlier than it is produced: activations one tick later,
    # gradients after `gradient_slack` more ticks (0: within the tick, PipeDream's timing)
    for k in range(num_stages - 1):
        assert timing.forward_lag == 1
        slack = timing.gradient_slack(k)
        assert slack == (1 if schedule == "layerpipe" else 0)
        for m in range(n):
            produced = m + (k + 1) + delays[k + 1]
            assert produced + slack == m + k + delays[k]
    # the epoch lasts as long as the single-process engine's steps plus its flush
    assert timing.length(n) == n + delays[0]


def test_sync_runs_each_microbatch_through_every_stage_before_the_next():
    timing = Timing((0, 0, 0), True)
    assert timing.length(5) == 5 and timing.forward_lag == 0 and timing.gradient_slack(0) == 0
    assert all(t == m for t, _, _, m in simulate(timing, 3, 5))


def test_world_from_the_environment():
    assert World.from_env({}) is None
    w = World.from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RESTART_COUNT": "1"})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size) == (2, 4, 0, 2)
    assert w.master_port == 29500 and w.store_hosted and w.prefix == "layerpipe/1/"
    assert not World.from_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}).store_hosted


def test_backend_choice():
    two = World(rank=0, world_size=2, local_world_size=2)
    assert choose_backend(torch.device("cpu"), "auto", two) == ("gloo", False)
    assert choose_backend(torch.device("cpu"), "gloo", two) == ("gloo", False)
    # CUDA without a GPU per process: gloo through CPU copies (no GPU is needed to decide)
    assert choose_backend(torch.device("cuda"), "gloo", two) == ("gloo", True)
    with pytest.raises(DistributedError, match="needs --device cuda"):
        choose_backend(torch.device("cpu"), "nccl", two)
    with pytest.raises(DistributedError, match="unknown backend"):
        choose_backend(torch.device("cpu"), "mpi", two)
    if not torch.cuda.is_available():
        assert choose_backend(torch.device("cuda"), "auto", two) == ("gloo", True)
        with pytest.raises(DistributedError, match="one GPU per process"):
            choose_backend(torch.device("cuda"), "nccl", two)


def test_boundary_shapes_from_a_probe_that_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Unflatten(1, (2, 4)), nn.Flatten(),
                          nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    specs = boundary_specs(model, [2, 2, 2], torch.randn(4, 5))
    assert specs == [((5,), torch.float32), ((8,), torch.float32), ((2, 4), torch.float32), ((3,), torch.float32)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm untouched
    assert model.training
    with pytest.raises(PlanError, match="batch as its first dimension"):
        boundary_specs(nn.Sequential(nn.Linear(5, 3), nn.Flatten(0)), [1, 1], torch.randn(4, 5))
    with pytest.raises(PlanError, match="at least two"):
        boundary_specs(model, [6], torch.randn(1, 5))


def test_plan_matches_the_single_process_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    for stages, weights, schedule in [(2, "ema", "layerpipe"), (3, "stash", "pipedream"), ([1, 3, 1], "sync", "layerpipe")]:
        pipe = Pipeline(model, stages=stages, weights=weights, schedule=schedule)
        expected = sequential_spec(model, stages, "sync" if weights == "sync" else schedule)
        assert pipe.spec == expected and Timing.of(pipe.spec) == pipe.timing


def test_stage_count_must_equal_the_process_count():
    check_stage_count(3, 3)
    check_stage_count([2, 1, 1], 3)
    check_stage_count(None, 4, num_layers=4)
    check_stage_count(None, 4)  # unknown until the model is built
    with pytest.raises(PlanError, match="--stages gives 2 stages but the run has 3 processes"):
        check_stage_count(2, 3)
    with pytest.raises(PlanError, match="gives 5 stages"):
        check_stage_count(None, 2, num_layers=5)


def test_fault_hook_parsing():
    assert _parse_fault(None, 0) is None
    assert _parse_fault("1:exit:7", 1) == ("exit", 7)
    assert _parse_fault("1:exit:7", 0) is None
    with pytest.raises(LayerpipeError, match="RANK:exit"):
        _parse_fault("1:explode:7", 1)


def test_the_first_failure_is_recorded_as_data():
    """The stage at fault travels as data through the store; the first writer wins."""
    import torch.distributed as dist

    store = dist.HashStore()
    monitor = FailureMonitor(0, 2, store, store, timeout=5.0)
    try:
        first = monitor.record("stage 1 failed: boom", 1, local=True)
        later = monitor.record("stage 0 is gone", 0, local=False)
        assert (first.stage, str(first), first.local) == (1, "stage 1 failed: boom", True)
        assert (later.stage, str(later), later.local) == (1, "stage 1 failed: boom", False)
        assert monitor.recorded().stage == 1
        gone = monitor.collective_failed("barrier", [1], RuntimeError("whatever the text"))
        assert gone.stage == 1  # the recorded failure stays the run's failure
    finally:
        monitor.stop(join=5)
    failure = StageFailure("stage 1 failed: boom", 1, local=True)
    assert isinstance(failure, DistributedError) and failure.stage == 1 and failure.local


def test_cli_refuses_stages_that_disagree_with_nproc(capsys):
    from layerpipe.cli.main import main

    assert main(["train", "--nproc", "3", "--stages", "2", "--no-progress"]) == 2
    assert "--stages gives 2 stages but the run has 3 processes" in capsys.readouterr().err
    assert main(["train", "--nproc", "0"]) == 2


@pytest.mark.distributed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("weights", ["ema", "sync"])
def test_one_process_world_equals_the_single_process_engine(weights, tmp_path):
    """K = 1 through the distributed code path (a store in memory, gloo with one rank): what
    `--nproc 1` and a single GPU run."""
    from types import SimpleNamespace

    from layerpipe.training import TrainConfig, epoch_lr, epoch_order, evaluate, set_lr, train

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(70, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return model, SimpleNamespace(x_train=x[:50], y_train=y[:50], x_test=x[50:], y_test=y[50:])

    def builder(config):
        config.dataset = "synthetic"
        model, data = make()
        return model, data, F.cross_entropy

    config = TrainConfig(model="mlp", stages="1", weights=weights, epochs=2, batch_size=8, optimizer="sgd", lr=0.1)
    result = train(config, run_dir=tmp_path, progress=False, save=tmp_path / "w.pt",
                   distributed={"builder": builder, "world": World(), "timeout": 20})
    model, data = make()
    pipe = Pipeline(model, stages=1, weights=weights, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                    loss_fn=F.cross_entropy)
    for epoch in range(2):
        set_lr([s.optimizer for s in pipe.stages], pipe.delays, epoch_lr(config, epoch), config.stage_lr)  # cosine: 0.1, then 0.05
        for idx in epoch_order(50, 8, 0, epoch):
            pipe.step(data.x_train[idx], data.y_train[idx])
        pipe.flush()
    saved = torch.load(tmp_path / "w.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value), name
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, F.cross_entropy)
    assert result.test_loss == test_loss and result.test_accuracy == test_acc
    assert [r["epoch"] for r in result.history] == [1, 2] and result.stages == [4] and result.delays == [0]
    assert set(result.summary()) >= {"test_accuracy", "weight_history_bytes", "stash_bytes", "run_dir"}


# -- parameters tied across processes: who owns, who reads, what is refused ---------------------------
def _tied_stages(weights: str):
    """Stage k of a 3-stage Sequential whose first and last layers share a weight, linked as
    its process links it (no messages are sent)."""
    from types import SimpleNamespace

    from layerpipe.engine.build import build_stages, sequential_modules
    from layerpipe.engine.distributed.tied import TiedLinks
    from layerpipe.engine.distributed.transport import MeshLayout

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[4].weight = model[0].weight
    spec = sequential_spec(model, [2, 2, 1], "layerpipe", None)
    modules = sequential_modules(model, spec)
    comm = SimpleNamespace(layout=MeshLayout(3), replica=0)
    out = []
    for k in range(3):
        (stage,) = build_stages(modules, spec, weights, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                F.cross_entropy, only=k)
        out.append((stage, TiedLinks(comm, stage, modules, spec, weights)))
    return model, out


def test_tied_parameter_across_processes_has_one_owner_and_a_replica_strategy_per_user():
    model, stages = _tied_stages("ema")
    (s0, t0), (s1, t1), (s2, t2) = stages
    w = model[0].weight
    assert any(p is w for p in s0.owned) and not any(p is w for p in s2.owned)
    assert [u.index for u in t0.users] == [2] and t0.users[0].rank == 2 and not t0.owners
    assert not t1.active
    (owner,) = t2.owners
    assert owner.index == 0 and owner.rank == 0 and owner.owned[0] is w
    assert owner.strategy.delay == s0.delay and owner.strategy.alpha == s0.strategy.alpha  # the owner's EMA
    assert s2.params[-1] is w and s2.strategy is not owner.strategy


def test_tied_parameter_across_processes_refuses_a_strategy_that_reads_the_optimizer():
    with pytest.raises(PlanError, match="weights 'momentum' reads the optimizer's state"):
        _tied_stages("momentum")
