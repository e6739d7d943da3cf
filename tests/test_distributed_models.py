"""The distributed runtime on models cut by `layerpipe.split` (issue 13), with real processes
(gloo on loopback): several tensors per boundary (a skip connection, a boolean mask, a value
without a batch dimension, a float input without a gradient), dict inputs; the weights equal
the single-process `Pipeline(model, split_points=..., example_inputs=...)` bit for bit. A
Hugging Face GPT-2 (its output layer tied to the token embedding) trained by a user script
through `layerpipe.train_pipeline` on 2 processes equals the same script in one process. A
parameter tied across processes (an embedding reused by the output head, 2 and 3 stages,
read by two or three of them): the single-process numbers, and under `sync` plain PyTorch's.

Run as a script, this file is the worker the tests launch (`python test_distributed_models.py MODE SPEC`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
EXAMPLE = HERE.parent.parent / "examples" / "hf_gpt2_distributed.py"
pytestmark = pytest.mark.distributed

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


class SkipNet(nn.Module):
    """Not an nn.Sequential: keyword inputs, a skip connection over the cut, a float input
    that needs no gradient (`scale`), a boolean one (`keep`), and a value without a batch
    dimension that needs a gradient (`w`)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x, scale, keep):
        h = torch.tanh(self.emb(x))
        s = torch.tanh(self.a(h))
        w = self.a.weight.sum(0)
        z = torch.tanh(self.b(s)) + h * scale.unsqueeze(-1) + w
        z = torch.where(keep.unsqueeze(-1), z, -z)
        return self.head(z)


class TiedLM(nn.Module):
    """A token embedding tied to the output head (GPT-2's wte and lm_head), also read as a
    matrix next to `b`: split at ["b"] stages 0 and 1 read it, at ["a", "head"] all three,
    at ["a", "b"] stages 0 and 2."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.a(self.emb(ids)))
        h = torch.tanh(self.b(h)) + 0.5 * F.linear(h, self.emb.weight[:8])
        return self.head(h)


def make_model(seed: int = 0, name: str = "skip") -> nn.Module:
    torch.manual_seed(seed)
    return TiedLM() if name == "tied" else SkipNet()


def make_tied_data(n: int = 29, n_test: int = 10, seq: int = 6, vocab: int = 11, seed: int = 1) -> dict:
    """Sequences whose next token is a fixed function of the current one (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n + n_test, seq), generator=g)
    y = (ids * 3 + 1) % vocab
    return {"x_train": ids[:n], "y_train": y[:n], "x_test": ids[n:], "y_test": y[n:]}


def seq_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def model_parts(name: str = "skip") -> tuple[nn.Module, dict, object]:
    """(model, data, loss) of a case's model."""
    if name == "tied":
        return make_model(0, "tied"), make_tied_data(), seq_loss
    return make_model(), make_data(), F.cross_entropy


def make_data(n: int = 47, n_test: int = 30, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, 6, generator=g)
    scale = torch.rand(n + n_test, generator=g)
    keep = torch.rand(n + n_test, generator=g) > 0.3
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()

    def part(sl):
        return {"x": x[sl], "scale": scale[sl], "keep": keep[sl]}

    return {"x_train": part(slice(0, n)), "y_train": y[:n], "x_test": part(slice(n, None)), "y_test": y[n:]}


def case(split_points, weights, schedule="layerpipe", opt="sgd", epochs=2, batch=5, model="skip", **extra):
    return dict(split_points=split_points, weights=weights, schedule=schedule, opt=opt, epochs=epochs, batch=batch,
                model=model, **extra)


def single_reference(c: dict) -> dict:
    """`Pipeline` on one thread (the workers' thread count: same kernels, same bits)."""
    from layerpipe import Pipeline
    from layerpipe.engine.batch import take
    from layerpipe.training import epoch_order
    from layerpipe.training.build import evaluate_split

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data, loss_fn = model_parts(c.get("model", "skip"))
        pipe = Pipeline(model, split_points=c["split_points"], weights=c["weights"], optimizer=OPTIMIZERS[c["opt"]],
                        loss_fn=loss_fn, schedule=c["schedule"], compensation=c.get("comp"),
                        example_inputs=take(data["x_train"], slice(0, c["batch"])))
        losses = []
        for epoch in range(c["epochs"]):
            for idx in epoch_order(len(data["y_train"]), c["batch"], 0, epoch):
                info = pipe.step(take(data["x_train"], idx), data["y_train"][idx])
                losses.extend(float(v) for v in info.losses.values())
            for info in pipe.flush():
                losses.extend(float(v) for v in info.losses.values())
        test = evaluate_split(pipe.split, data["x_test"], data["y_test"], loss_fn)
        return {"state": model.state_dict(), "losses": losses, "test": test, "delays": pipe.delays,
                "boundaries": [len(b) for b in pipe.split.boundaries], "history": pipe.weight_history_bytes()}
    finally:
        torch.set_num_threads(threads)


# -- worker side ---------------------------------------------------------------------------------------
def worker_cases(spec: dict) -> None:
    """Every case on one connection: split the same model on the same example, train, save."""
    from layerpipe.engine.batch import take
    from layerpipe.engine.distributed import Comm, StageWorker, World
    from layerpipe.engine.single import cut_model, resolve_strategy
    from layerpipe.plan import split_spec
    from layerpipe.training import epoch_order

    torch.set_num_threads(1)
    comm = Comm(World.from_env(), timeout=spec.get("timeout", 30), dp=spec.get("dp", 1))
    out = Path(spec["out"])
    def build(c: dict):
        model, data, loss_fn = model_parts(c.get("model", "skip"))
        strategy, schedule = resolve_strategy(c["weights"], c["schedule"])
        split = cut_model(model, None, c["split_points"], take(data["x_train"], slice(0, c["batch"])))
        worker = StageWorker(comm, model, split_spec(split.split_points, schedule), weights=strategy,
                             optimizer=OPTIMIZERS[c["opt"]], loss_fn=loss_fn, split=split, compensation=c.get("comp"))
        return worker, data

    for i, c in enumerate(spec["cases"]):
        worker, data = build(c)
        losses = []
        for epoch in range(c["epochs"]):
            if epoch and c.get("restart"):  # a fresh process's worker from this one's checkpoint
                state = worker.state_dict()
                worker, data = build(c)
                with torch.no_grad():  # other weights: everything must come from the state
                    for p in worker.module.parameters():
                        p.add_(1.0)
                worker.load_state_dict(state)
            order = epoch_order(len(data["y_train"]), c["batch"], 0, epoch)
            losses += [float(v) for v in worker.run_epoch(data["x_train"], data["y_train"], order)]
        test = worker.evaluate(data["x_test"], data["y_test"])
        if worker.replica == 0:
            torch.save({"state": worker.model_state_dict(), "losses": losses, "test": test, "delays": worker.delays,
                        "history": worker.history_bytes(), "tied": worker.tied.active},
                       out / f"case{i}-stage{worker.rank}.pt")
    comm.close()


# -- test side ---------------------------------------------------------------------------------------------
def launch_script(cmd: list[str], nproc: int, deadline: float = 150):
    from layerpipe.cli.launch import launch

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    return launch([sys.executable, *cmd], nproc, env=env, threads_per_process=1, deadline=deadline)


def launch_worker(mode: str, spec: dict, nproc: int, tmp_path: Path):
    spec_path = tmp_path / f"spec-{mode}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    return launch_script([str(HERE), mode, str(spec_path)], nproc)


def _two_replica_runs(cases: list, tmp_path):
    """Run `cases` on 2 stages x 2 replicas; per case (index, case, single-process reference,
    the distributed run's merged final state)."""
    result = launch_worker("cases", {"out": str(tmp_path), "cases": cases, "dp": 2}, 4, tmp_path)
    assert result.returncode == 0, result.message
    for i, c in enumerate(cases):
        got: dict = {}
        for k in range(2):
            got.update(torch.load(tmp_path / f"case{i}-stage{k}.pt")["state"])
        yield i, c, single_reference(c), got


@pytest.mark.timeout(150)
def test_split_model_with_two_data_parallel_replicas_equals_single_process(tmp_path):
    """2 stages x 2 replicas: each global microbatch of 6 is split 3 + 3; the gradients are
    all-reduced, so the weights are the single process's with microbatches of 6 (to rounding)."""
    cases = [case(["b"], "stash", batch=6), case(["b"], "ema", opt="adam", batch=6)]
    for i, c, ref, got in _two_replica_runs(cases, tmp_path):
        for name, want in ref["state"].items():
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=f"{c} {name}")
        assert torch.load(tmp_path / f"case{i}-stage1.pt")["test"][0] == pytest.approx(ref["test"][0], rel=1e-5)


CASES = {
    2: [case(["b"], "stash"), case(["b"], "ema", opt="adam"), case(["b"], "sync"), case(["b"], "ema", "pipedream", batch=4)],
    3: [case(["a", "b"], "stash", opt="adam"), case(["a", "b"], "ema")],
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("nproc", [2, 3])
def test_split_model_distributed_equals_single_process_bit_for_bit(nproc, tmp_path):
    result = launch_worker("cases", {"out": str(tmp_path), "cases": CASES[nproc]}, nproc, tmp_path)
    assert result.returncode == 0, result.message
    for i, c in enumerate(CASES[nproc]):
        ref = single_reference(c)
        if nproc == 2:  # s, h (the skip connection), scale, keep, w cross the cut
            assert ref["boundaries"] == [5], ref["boundaries"]
        got: dict = {}
        for r in range(nproc):
            got.update(torch.load(tmp_path / f"case{i}-stage{r}.pt")["state"])
        assert sorted(got) == sorted(ref["state"]), c
        for name, want in ref["state"].items():
            assert torch.equal(got[name], want), f"{c} {name}: {(got[name] - want).abs().max():.2e}"
        last = torch.load(tmp_path / f"case{i}-stage{nproc - 1}.pt")
        assert last["losses"] == ref["losses"], c
        assert last["test"] == ref["test"] and last["delays"] == ref["delays"], c


def plain_pytorch(c: dict) -> dict[str, torch.Tensor]:
    """Ordinary training of the whole model on the same microbatches (what `sync` must equal)."""
    from layerpipe.training import epoch_order

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data, loss_fn = model_parts(c["model"])
        opt = OPTIMIZERS[c["opt"]](list(model.parameters()))
        for epoch in range(c["epochs"]):
            for idx in epoch_order(len(data["y_train"]), c["batch"], 0, epoch):
                opt.zero_grad()
                loss_fn(model(data["x_train"][idx]), data["y_train"][idx]).backward()
                opt.step()
        return model.state_dict()
    finally:
        torch.set_num_threads(threads)


def tied_case(split_points, weights, schedule="layerpipe", batch=4, **kw):
    return case(split_points, weights, schedule, model="tied", batch=batch, **kw)


TIED_CASES = {
    2: [tied_case(["b"], "sync"), tied_case(["b"], "stash"), tied_case(["b"], "ema", opt="adam"),
        tied_case(["b"], "ema", "pipedream"),
        # accumulated updates: the owner tells its users which ticks made a new version
        tied_case(["b"], "ema", "pipedream", comp=["accumulate:every=2"])],
    3: [tied_case(["a", "head"], "sync"), tied_case(["a", "head"], "stash", opt="adam"), tied_case(["a", "head"], "ema"),
        tied_case(["a", "b"], "stash"), tied_case(["a", "b"], "ema", "pipedream", opt="adam"),
        tied_case(["a", "head"], "ema", restart=True),  # resumed after epoch 0: the users' replicas too
        tied_case(["a", "head"], "ema", comp=["accumulate:every=3"]),
        tied_case(["a", "head"], "stash", opt="adam", comp=["accumulate:every=2"], restart=True)],
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("nproc", [2, 3])
def test_parameters_tied_across_processes_train_as_in_one_process(nproc, tmp_path):
    """The embedding's owner (stage 0) applies the sum of every user's gradient part; the
    users receive each new value and keep their own history of it: the single process's
    weights, losses and test numbers, bit for bit; under sync, plain PyTorch's weights."""
    cases = TIED_CASES[nproc]
    result = launch_worker("cases", {"out": str(tmp_path), "cases": cases}, nproc, tmp_path)
    assert result.returncode == 0, result.message
    for i, c in enumerate(cases):
        ref = single_reference(c)
        stages = [torch.load(tmp_path / f"case{i}-stage{r}.pt") for r in range(nproc)]
        assert stages[0]["tied"] and stages[-1]["tied"], c
        got: dict = {}
        for r in range(nproc):
            got.update(stages[r]["state"])
        assert sorted(got) == sorted(ref["state"]) and "head.weight" in got, c
        for name, want in ref["state"].items():
            assert torch.equal(got[name], want), f"{c} {name}: {(got[name] - want).abs().max():.2e}"
        assert stages[-1]["losses"] == ref["losses"] and stages[-1]["test"] == ref["test"], c
        # a user's own history of its copy counts: the middle stage's (delay 2) is extra
        if c["weights"] == "stash":
            extra = sum(s["history"] for s in stages) - ref["history"]
            assert extra > 0 if c["split_points"] == ["a", "head"] else extra >= 0, c
        if c["weights"] == "sync":
            for name, want in plain_pytorch(c).items():
                torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=f"{c} {name}")


@pytest.mark.timeout(150)
def test_tied_parameters_with_two_data_parallel_replicas_equal_single_process(tmp_path):
    """2 stages x 2 replicas with the tied embedding: each replica's part goes to its own
    replica of the owner, before the all-reduce (to rounding: the sum is in another order)."""
    cases = [tied_case(["b"], "stash", batch=6), tied_case(["b"], "ema", opt="adam", batch=6)]
    for _, c, ref, got in _two_replica_runs(cases, tmp_path):
        for name, want in ref["state"].items():
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=f"{c} {name}")


def test_train_pipeline_in_one_process_checks_its_arguments():
    import layerpipe
    from layerpipe.errors import LayerpipeError, PlanError

    def data():
        d = make_data()
        return d["x_train"], d["y_train"], d["x_test"], d["y_test"]

    with pytest.raises(PlanError, match="give split_points"):
        layerpipe.train_pipeline(SkipNet, data, F.cross_entropy)
    with pytest.raises(LayerpipeError, match="missing x_test, y_test"):
        layerpipe.train_pipeline(SkipNet, lambda: {"x_train": 1, "y_train": 2}, F.cross_entropy, split_points=["b"])
    with pytest.raises(PlanError, match="no_such"):
        layerpipe.train_pipeline(SkipNet, data, F.cross_entropy, split_points=["no_such"])
    result = layerpipe.train_pipeline(SkipNet, data, F.cross_entropy, split_points=["b"], batch_size=5, lr=0.01)
    assert result.stages == [1, 1] and 0 <= result.test_accuracy <= 1 and result.config["model"] == "custom"


def _load_example():
    spec = importlib.util.spec_from_file_location("hf_gpt2_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_hugging_face_gpt2_user_script_on_two_processes_equals_one_process(tmp_path):
    pytest.importorskip("transformers")
    args = ["--epochs", "2", "--batch-size", "4", "--threads", "1"]
    result = launch_script([str(EXAMPLE), *args, "--save", str(tmp_path / "two.pt")], 2, deadline=240)
    assert result.returncode == 0, result.message
    threads = torch.get_num_threads()
    try:
        single = _load_example().main([*args, "--save", str(tmp_path / "one.pt")])  # all stages in this process
    finally:
        torch.set_num_threads(threads)
    assert single.stages == [1, 1] and single.delays == [2, 0]
    want, got = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert list(got) == list(want) and "lm_head.weight" in want
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name
    assert single.history[-1]["train_loss"] < single.history[0]["train_loss"]


def _main(argv: list[str]) -> None:
    mode, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    {"cases": worker_cases}[mode](spec)


if __name__ == "__main__":
    _main(sys.argv[1:])
