"""Every bad input ends in one clear line and a non-zero exit (CLI), or a `LayerpipeError`
subclass with a clear message (API). Table-driven: one row per kind of bad input.

The CLI rows run in this process (`layerpipe.cli.main.main`) and stop before any training:
each is refused while the arguments, the config and the output places are checked.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpipe import Pipeline
from layerpipe.cli.main import main
from layerpipe.engine.checks import PipelineArgumentError, PipelineInputError
from layerpipe.errors import LayerpipeError, PlanError

pytestmark = pytest.mark.timeout(60)

TRAIN = ["train", "--model", "mlp", "--dataset", "digits", "--samples", "100", "--epochs", "1", "--no-progress"]
COMPARE = ["compare", "--model", "mlp", "--dataset", "digits", "--samples", "100", "--epochs", "1", "--no-progress"]

# (id, argv, fragment of the one error line); {tmp} is a fresh folder, {run} one that holds a
# finished run, {file} an existing file, {dir} an empty folder, {ro} a place nobody may write to
CLI_CASES = [
    ("model-option-type", TRAIN + ["--model-option", "hidden=abc"], "hidden='abc'"),
    ("model-option-bool", ["train", "--model", "cnn1d", "--model-option", "norm=maybe"], "must be true or false"),
    ("model-option-int", ["train", "--model", "snn", "--model-option", "time_steps=1.5"], "must be an integer"),
    ("model-option-negative", ["train", "--model", "snn", "--model-option", "time_steps=-3"], "at least 1"),
    ("model-option-unknown", TRAIN + ["--model-option", "depth=3"], "has no option depth"),
    ("model-option-syntax", TRAIN + ["--model-option", "hidden"], "KEY=VALUE"),
    ("weight-option-unknown", TRAIN + ["--weight-option", "beta=2"], "does not take option"),
    ("compensation-unknown", TRAIN + ["--compensation", "bogus"], "unknown compensation 'bogus'"),
    ("compensation-option-syntax", TRAIN + ["--compensation", "muon:lr"], "is not KEY=VALUE"),
    ("compensation-option-twice", TRAIN + ["--compensation", "pipemare:pipeline_lr=1,pipeline_lr=2"],
     "option 'pipeline_lr' given twice"),
    ("compensation-option-type", TRAIN + ["--compensation", "pipemare:anneal=abc"], "compensation 'pipemare'"),
    ("compensation-option-value", TRAIN + ["--run-dir", "{tmp}", "--compensation", "muon:delayed_momentum=deep"],
     "delayed_momentum must be"),
    ("compensation-max-delay", TRAIN + ["--run-dir", "{tmp}", "--compensation", "muon:max_delay=3"],
     "max_delay is the pipeline's largest delay"),
    ("compensation-pipeline-lr", TRAIN + ["--run-dir", "{tmp}", "--compensation", "pipemare:pipeline_lr=0"],
     "pipeline_lr must be a factor"),
    ("sync-warmup-negative", TRAIN + ["--sync-warmup", "-1"], "--sync-warmup must be >= 0"),
    ("accumulate-twice", TRAIN + ["--max-stale-samples", "8", "--compensation", "accumulate:every=2"],
     "accumulates the microbatches of a split batch already"),
    ("pipeline-warmup-negative", TRAIN + ["--run-dir", "{tmp}", "--compensation", "pipemare:pipeline_warmup=-1"],
     "pipeline_warmup must be a number of ticks"),
    ("lr-schedule-unknown", TRAIN + ["--lr-schedule", "weekly"], "invalid choice"),
    ("lr-nan", TRAIN + ["--lr", "nan"], "--lr must be a positive number"),
    ("lr-inf", TRAIN + ["--lr", "inf"], "--lr must be a positive number"),
    ("lr-negative", TRAIN + ["--lr", "-0.1"], "--lr must be a positive number"),
    ("lr-text", TRAIN + ["--lr", "fast"], "invalid float value"),
    ("device-tpu", TRAIN + ["--device", "tpu"], "--device"),
    ("device-garbage", TRAIN + ["--device", "cuda:x"], "--device"),
    ("threads-negative", TRAIN + ["--threads", "-2"], "--threads"),
    ("epochs-zero", TRAIN + ["--epochs", "0"], "--epochs must be at least 1"),
    ("batch-zero", TRAIN + ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("samples-zero", TRAIN + ["--samples", "0"], "--samples"),
    ("momentum-nan", TRAIN + ["--momentum", "nan"], "--momentum"),
    ("momentum-one", TRAIN + ["--momentum", "1.5"], "--momentum"),
    ("weight-decay-negative", TRAIN + ["--weight-decay", "-1"], "--weight-decay"),
    ("warmup-negative", TRAIN + ["--warmup-epochs", "-1"], "--warmup-epochs"),
    ("seed-negative", TRAIN + ["--seed", "-1"], "--seed"),
    ("unknown-model", ["train", "--model", "vgg"], "unknown model 'vgg'"),
    ("unknown-dataset", TRAIN + ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    ("model-dataset-mismatch", ["train", "--model", "gpt", "--dataset", "digits"], "cannot train on dataset 'digits'"),
    ("dataset-model-mismatch", ["train", "--model", "mlp", "--dataset", "text"], "cannot train on dataset 'text'"),
    ("unknown-weights", TRAIN + ["--weights", "magic"], "unknown weight strategy"),
    ("sync-with-strategy", TRAIN + ["--schedule", "sync"], "invalid choice"),
    ("stages-text", TRAIN + ["--stages", "two"], "--stages must be integers"),
    ("stages-zero", TRAIN + ["--stages", "0"], "--stages must be a positive number"),
    ("stages-too-many", TRAIN + ["--stages", "50"], "stage"),
    ("stages-sum", TRAIN + ["--stages", "1,1"], "layer"),
    ("stages-more-than-layers", ["train", "--model", "gpt", "--samples", "50", "--model-option", "n_layer=1",
                                 "--run-dir", "{tmp}"], "every stage needs at least one layer"),
    ("timeout-zero", TRAIN + ["--nproc", "2", "--stages", "2", "--timeout", "0", "--run-dir", "{tmp}"], "--timeout"),
    ("timeout-nan", TRAIN + ["--nproc", "2", "--stages", "2", "--timeout", "nan", "--run-dir", "{tmp}"], "--timeout"),
    ("nproc-zero", TRAIN + ["--nproc", "0"], "--nproc must be at least 1"),
    ("nproc-vs-stages", TRAIN + ["--nproc", "2", "--stages", "3", "--run-dir", "{tmp}"], "must be equal"),
    ("checkpoint-every-negative", TRAIN + ["--checkpoint-every", "-1", "--run-dir", "{tmp}"], "--checkpoint-every"),
    ("resume-without-run-dir", TRAIN + ["--resume"], "--resume needs --run-dir"),
    ("resume-without-checkpoint", TRAIN + ["--resume", "--run-dir", "{tmp}"], "no checkpoint"),
    ("resume-and-overwrite", TRAIN + ["--resume", "--overwrite", "--run-dir", "{run}"], "choose one"),
    ("run-dir-holds-a-run", TRAIN + ["--run-dir", "{run}"], "already holds a run"),
    ("run-dir-is-a-file", TRAIN + ["--run-dir", "{file}"], "is a file"),
    ("run-dir-unwritable", TRAIN + ["--run-dir", "{ro}/run"], "cannot write"),
    ("save-is-a-folder", TRAIN + ["--run-dir", "{tmp}", "--save", "{dir}"], "is a folder"),
    ("save-unwritable", TRAIN + ["--run-dir", "{tmp}", "--save", "{ro}/model.pt"], "cannot write"),
    ("save-exists", TRAIN + ["--run-dir", "{tmp}", "--save", "{file}"], "exists"),
    ("save-under-a-file", TRAIN + ["--run-dir", "{tmp}", "--save", "{file}/model.pt"], "is a file"),
    ("compare-out-is-a-file", COMPARE + ["--out", "{file}"], "is a file"),
    ("compare-out-has-results", COMPARE + ["--out", "{results}"], "already holds results"),
    ("compare-out-unwritable", COMPARE + ["--out", "{ro}/cmp"], "cannot write"),
    ("compare-jobs-zero", COMPARE + ["--jobs", "0", "--out", "{tmp}"], "--jobs must be at least 1"),
    ("compare-seeds-text", COMPARE + ["--seeds", "a,b", "--out", "{tmp}"], "--seeds must be comma-separated"),
    ("compare-unknown-weights", COMPARE + ["--weights", "sync,nope", "--out", "{tmp}"], "unknown weight strategy"),
    ("compare-repeated-weights", COMPARE + ["--weights", "ema,ema", "--out", "{tmp}"], "must not repeat"),
    ("unknown-flag", TRAIN + ["--bogus"], "unrecognized arguments"),
    ("unknown-command", ["fly"], "invalid choice"),
    ("stage-lr-unknown", TRAIN + ["--stage-lr", "bogus"], "invalid choice"),
]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"header": true}\n')
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.md").write_text("# earlier results\n")
    file = tmp_path / "file.txt"
    file.write_text("keep me\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    # a place nobody may write to, root included (a chmod-ed folder would not stop root)
    ro = "/proc/layerpipe-unwritable"
    return {"tmp": str(tmp_path / "new"), "run": str(run), "file": str(file), "ro": ro, "dir": str(folder),
            "results": str(results)}


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(argv, fragment, places, capsys):
    argv = [a.format(**places) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), (out, err)
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    # nothing good lost: the files already there are untouched
    assert Path(places["file"]).read_text() == "keep me\n"
    # and nothing left behind: no empty run folder for a run that never started
    assert not Path(places["tmp"]).exists() or any(Path(places["tmp"]).iterdir())
    assert (Path(places["run"]) / "metrics.jsonl").read_text() == '{"header": true}\n'
    assert (Path(places["results"]) / "results.md").read_text() == "# earlier results\n"
    assert not Path(places["tmp"]).exists()  # refused before any output (no empty run folder)


# -- the API -----------------------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def sgd(ps):
    return torch.optim.SGD(ps, lr=0.1)


def build(**kw):
    args = dict(model=mlp(), stages=2, weights="stash", optimizer=sgd, loss_fn=F.cross_entropy)
    args.update(kw)
    return Pipeline(**args)


def first_step(pipe_kw=None, x=None, y=None):
    pipe = build(**(pipe_kw or {}))
    pipe.step(torch.randn(4, 6) if x is None else x, torch.tensor([0, 1, 2, 0]) if y is None else y)


API_CASES = [
    ("model-not-sequential", lambda: build(model=nn.Linear(6, 3)), PlanError, "nn.Sequential"),
    ("model-empty", lambda: build(model=nn.Sequential(), stages=None), PlanError, "no layers"),
    ("model-none", lambda: build(model=None), PlanError, "nn.Sequential"),
    ("stages-float", lambda: build(stages=2.5), PipelineArgumentError, "stages must be"),
    ("stages-str", lambda: build(stages="2"), PipelineArgumentError, "stages must be"),
    ("stages-bool", lambda: build(stages=True), PipelineArgumentError, "stages must be"),
    ("stages-list-of-str", lambda: build(stages=["1", "4"]), PipelineArgumentError, "stages must be"),
    ("stages-more-than-layers", lambda: build(stages=9), PlanError, "layer"),
    ("stages-wrong-sum", lambda: build(stages=[1, 1]), PlanError, "layer"),
    ("stages-zero", lambda: build(stages=0), PlanError, ""),
    ("weights-unknown", lambda: build(weights="magic"), LayerpipeError, "unknown weight strategy"),
    ("weights-not-str", lambda: build(weights=3), PipelineArgumentError, "weights must be"),
    ("schedule-unknown", lambda: build(schedule="gpipe"), PlanError, "unknown schedule"),
    ("sync-with-stash", lambda: build(schedule="sync"), LayerpipeError, "sync schedule"),
    ("loss-none", lambda: build(loss_fn=None), PipelineArgumentError, "loss_fn must be"),
    ("loss-not-callable", lambda: build(loss_fn="mse"), PipelineArgumentError, "loss_fn must be"),
    ("optimizer-not-callable", lambda: build(optimizer=0.1), PipelineArgumentError, "optimizer must be a factory"),
    ("optimizer-instance", lambda: build(optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1)),
     PipelineArgumentError, "not an optimizer"),
    ("optimizer-returns-none", lambda: build(optimizer=lambda ps: None), PipelineArgumentError, "returned NoneType"),
    ("optimizer-returns-other", lambda: build(optimizer=lambda ps: ps), PipelineArgumentError, "not a torch.optim"),
    ("optimizer-foreign-params", lambda: build(optimizer=lambda ps: torch.optim.SGD(mlp().parameters(), lr=0.1)),
     PipelineArgumentError, "does not hold"),
    ("delays-negative", lambda: build(delays=[-1, 0]), PipelineArgumentError, "delays must be"),
    ("delays-illegal", lambda: build(delays=[0, 2]), PlanError, ""),
    ("weight-options-not-mapping", lambda: build(weight_options=[("alpha", 0.3)]), PipelineArgumentError,
     "weight_options must be"),
    ("weight-option-unknown", lambda: build(weights="ema", weight_options={"beta": 1}), LayerpipeError,
     "does not take option"),
    ("x-not-tensor", lambda: first_step(x=[[0.0] * 6] * 4), PipelineInputError, "takes tensors"),
    ("batch-mismatch", lambda: first_step(y=torch.tensor([0, 1])), PipelineInputError, "first (batch) dimension"),
    ("x-wrong-dtype", lambda: first_step(x=torch.randn(4, 6, dtype=torch.float64)), PipelineInputError, "float64"),
    ("x-wrong-width", lambda: first_step(x=torch.randn(4, 5)), PipelineInputError, "layer 0 (Linear)"),
    ("shapes-do-not-chain", lambda: first_step({"model": nn.Sequential(nn.Linear(6, 8), nn.Linear(7, 3))}),
     PipelineInputError, "layer 1 (Linear) cannot take the output of layer 0"),
    ("labels-wrong-dtype", lambda: first_step(y=torch.tensor([0.0, 1.0, 2.0, 0.0])), PipelineInputError, "loss_fn"),
    ("loss-not-scalar", lambda: first_step({"loss_fn": lambda o, t: o}), PipelineInputError, "scalar"),
]


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_a_layerpipe_error(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, LayerpipeError)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


def test_the_table_covers_at_least_forty_kinds():
    assert len(CLI_CASES) + len(API_CASES) >= 40


def test_a_good_first_step_leaves_training_unchanged():
    """The one-off check of the first microbatch changes no state: same numbers as without it."""
    from layerpipe.engine import single

    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    a = build()
    for _ in range(3):
        a.step(x, y)
    a.flush()
    original = single.check_first_batch
    single.check_first_batch = lambda *args: None
    try:
        b = build()
        for _ in range(3):
            b.step(x, y)
        b.flush()
    finally:
        single.check_first_batch = original
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
