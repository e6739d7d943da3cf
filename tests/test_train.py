"""The training loop and `layerpipe train`: results, determinism, records, saves, resume."""
from __future__ import annotations

import json

import pytest
import torch

from layerpipe.cli.main import main
from layerpipe.training import TrainConfig, split_blocks, train

SMALL = dict(model="cnn1d", samples=600, epochs=2, batch_size=32, optimizer="sgd", lr=0.05)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LAYERPIPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_same_seed_same_numbers_and_records(tmp_path):
    a = train(TrainConfig(**SMALL, weights="ema", stages="4"), run_dir=tmp_path / "a", progress=False)
    b = train(TrainConfig(**SMALL, weights="ema", stages="4"), run_dir=tmp_path / "b", progress=False)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.test_accuracy == b.test_accuracy and 0.0 <= a.test_accuracy <= 1.0
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["config"]["weights"] == "ema" and "commit" in header["environment"]
    assert [json.loads(line)["epoch"] for line in lines[1:]] == [1, 2]
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000
    # bytes: ema holds one copy of the delayed stages, stash would hold d_k copies
    assert 0 < a.weight_history_bytes <= a.parameter_bytes < a.stash_bytes


def test_stash_bytes_reported_match_delays(tmp_path):
    r = train(TrainConfig(**SMALL, weights="stash", stages="2,1,1,1"), progress=False)
    assert r.delays == [6, 4, 2, 0]
    assert r.weight_history_bytes == r.stash_bytes


def test_split_blocks_allows_deeper_pipelines():
    from layerpipe.models import build_model

    model = build_model("cnn1d")
    flat = split_blocks(model)
    assert len(flat) > len(model)
    assert [p.data_ptr() for p in flat.parameters()] == [p.data_ptr() for p in model.parameters()]
    x = torch.randn(3, 40)
    torch.testing.assert_close(flat(x), model(x))
    r = train(TrainConfig(**{**SMALL, "epochs": 1}, weights="latest", stages="8"), progress=False)
    assert len(r.stages) == 8


def test_cli_json_last_line(capsys, tmp_path):
    rc = main(["train", "--samples", "600", "--epochs", "1", "--stages", "3", "--weights", "stash", "--json",
               "--no-progress", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("test_accuracy", "weight_history_bytes", "parameter_bytes", "stages", "delays", "weights", "seconds"):
        assert key in out
    assert out["weights"] == "stash" and len(out["stages"]) == 3 and out["delays"] == [4, 2, 0]


def test_nan_stops_without_overwriting_a_good_save(capsys, tmp_path):
    save = tmp_path / "model.pt"
    args = ["train", "--samples", "600", "--epochs", "1", "--no-progress", "--optimizer", "sgd",
            "--run-dir", str(tmp_path / "run"), "--save", str(save)]
    assert main(args + ["--lr", "0.05"]) == 0
    good = save.read_bytes()
    assert set(torch.load(save)) == set(dict(__import__("layerpipe.models", fromlist=["x"]).build_model("cnn1d").state_dict()))
    capsys.readouterr()
    rc = main(args + ["--lr", "1e12", "--overwrite"])  # replaces the run folder; the save only if it ends well
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "loss" in err
    assert save.read_bytes() == good


@pytest.mark.parametrize("weights", ["stash", "ema"])
def test_resume_equals_uninterrupted(tmp_path, weights):
    config = dict(**{**SMALL, "epochs": 3}, weights=weights, stages="3")
    full = train(TrainConfig(**config), run_dir=tmp_path / "full", progress=False, save=tmp_path / "full.pt")
    # the interrupted run dies after epoch 2's checkpoint, then resumes to epoch 3

    def crash(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config), run_dir=tmp_path / "part", progress=False, checkpoint_every=1, on_epoch=crash)
    resumed = train(TrainConfig(**config), run_dir=tmp_path / "part", progress=False, resume=True,
                    save=tmp_path / "resumed.pt")
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.test_accuracy == full.test_accuracy


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--weights", "magic"], "unknown weight strategy"),
        (["--stages", "9,9"], "hold 18 layers"),
        (["--stages", "x"], "--stages"),
        (["--model", "nope"], "unknown model"),
        (["--epochs", "0"], "at least 1"),
        (["--max-stale-samples", "-1"], "--max-stale-samples must be 0 (off) or a positive integer"),
        (["--resume"], "--resume"),
        (["--model-option", "norm"], "KEY=VALUE"),
        (["--model-option", "depth=3"], "has no option depth; its options: channels, stem_kernel, norm"),
    ],
)
def test_cli_bad_input_one_line(capsys, argv, message):
    rc = main(["train", "--samples", "600", "--epochs", "1", "--no-progress"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and message in err[0], err


def test_parse_model_options():
    from layerpipe.cli.common import parse_model_options

    assert parse_model_options(["norm=false", "time_steps=8", "channels=(16, 32)", "beta=0.5", "act=gelu"]) == {
        "norm": False, "time_steps": 8, "channels": (16, 32), "beta": 0.5, "act": "gelu"}


def test_model_option_reaches_the_builder(capsys, tmp_path):
    rc = main(["train", "--samples", "600", "--epochs", "1", "--stages", "2", "--json", "--no-progress",
               "--model-option", "norm=false", "--model-option", "channels=(8, 8)", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # stem conv 8*1*5+8, one stride-2 conv 8*8*3+8, head 8*20*10+10; no BatchNorm parameters
    assert out["parameter_bytes"] == 4 * (48 + 200 + 1610)
    header = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["model_options"] == {"norm": False, "channels": [8, 8]}


def test_stage_lr_inverse_delay_scales_each_stage_by_its_delay():
    from layerpipe.training import set_lr

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
    opts = [torch.optim.SGD([p], lr=1.0) for p in params]
    set_lr(opts, [6, 4, 2, 0], 0.3, "inverse-delay")
    assert [o.param_groups[0]["lr"] for o in opts] == pytest.approx([0.05, 0.075, 0.15, 0.3])
    set_lr(opts, [6, 4, 2, 0], 0.3, "same")
    assert [o.param_groups[0]["lr"] for o in opts] == [0.3] * 4


def test_stage_lr_changes_pipelined_training_but_not_sync():
    def final(weights, stage_lr):
        return train(TrainConfig(**SMALL, stages="3", weights=weights, stage_lr=stage_lr), progress=False).history[-1]["train_loss"]

    assert final("sync", "inverse-delay") == final("sync", "same")  # no delays: nothing to scale
    assert final("stash", "inverse-delay") != final("stash", "same")


def test_unknown_stage_lr_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stage-lr", "bogus"])
    assert "--stage-lr" in capsys.readouterr().err


def test_resume_refuses_other_model_options():
    from layerpipe.errors import LayerpipeError
    from layerpipe.training import check_checkpoint_config

    saved = TrainConfig(**SMALL, model_options={"norm": False})
    check_checkpoint_config({"config": saved.to_dict()}, saved, "the checkpoint")
    with pytest.raises(LayerpipeError, match="the checkpoint was made with other settings: model_options="):
        check_checkpoint_config({"config": saved.to_dict()}, TrainConfig(**SMALL), "the checkpoint")


@pytest.mark.parametrize("argv", [["train", "--stage-lr", "bogus"], ["compare", "--jobs", "x"], ["nope"]])
def test_usage_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "error:" in err[0] and "--help" in err[0], err


def test_sync_warmup_over_the_whole_run_is_ordinary_training():
    """With every microbatch drained before the next (--sync-warmup covering the run), no
    gradient is stale: a pipelined strategy gives the synchronous weights bit for bit; a
    shorter warm-up gives something between."""
    import torch

    def weights(**kw):
        result = train(TrainConfig(**{**SMALL, "epochs": 1, **kw}), progress=False)
        return result.test_loss

    sync = weights(weights="sync")
    assert weights(weights="stash", sync_warmup=10_000) == sync
    assert weights(weights="ema", sync_warmup=10_000) == sync
    partial = weights(weights="stash", sync_warmup=5)
    assert partial != sync and partial != weights(weights="stash")
    assert torch.isfinite(torch.tensor(partial))


def test_one_process_moves_inputs_and_labels_to_the_device(monkeypatch):
    # regression: the single-process engine holds the last stage too, so its labels must go to
    # the device (on CUDA they stayed on the CPU and the loss failed on the first batch)
    import layerpipe.training.loop as loop

    moved = []
    real = loop.to_device

    def recording(value, device):
        moved.append(value)
        return real(value, device)

    monkeypatch.setattr(loop, "to_device", recording)
    config = TrainConfig(**{**SMALL, "epochs": 1}, weights="stash", stages="3")
    from layerpipe.training.build import build

    _, data, _ = build(config)
    train(config, progress=False)
    assert any(torch.equal(m, data.x_train) for m in moved if m.shape == data.x_train.shape)
    assert any(torch.equal(m, data.y_train) for m in moved if m.shape == data.y_train.shape)


def test_max_stale_samples_picks_the_largest_microbatch_within_the_bound():
    # the transformer's recipe: 4 sequences, at most 4 samples of staleness
    gpt = TrainConfig(model="gpt", stages="8", weights="ema")
    assert (gpt.batch_size, gpt.max_stale_samples) == (4, 4)
    assert [gpt.microbatch(d) for d in (0, 1, 2, 3, 4, 5, 7, 9)] == [4, 4, 2, 1, 1, 1, 1, 1]
    assert gpt.microbatch(1, replicas=2) == 2  # 2 replicas: 1 x 2 x 2 = 4 <= 4
    # a microbatch the user gives is kept at every depth, unless they also bound staleness
    assert TrainConfig(model="gpt", stages="8", batch_size=4).microbatch(7) == 4
    # a divisor of the batch: 16 // 3 = 5 samples allowed, so 4, two of them per update
    eight = TrainConfig(model="gpt", stages="8", batch_size=8, max_stale_samples=16)
    assert (eight.microbatch(3), eight.accumulation(3)) == (4, 2)
    assert [gpt.accumulation(d) for d in (0, 1, 2, 3, 7)] == [1, 1, 2, 4, 4]
    assert gpt.run_compensation(7)[-1] == "accumulate:every=4" and gpt.run_compensation(1) == gpt.compensation
    assert TrainConfig(**SMALL).max_stale_samples == 0 and TrainConfig(**SMALL).microbatch(6) == 32


def test_max_stale_samples_refuses_a_second_accumulation():
    from layerpipe.errors import LayerpipeError

    with pytest.raises(LayerpipeError, match="accumulates the microbatches of a split batch already"):
        TrainConfig(model="gpt", stages="8", compensation=["accumulate:every=2"], max_stale_samples=8, batch_size=4)


def test_max_stale_samples_trains_as_that_microbatch_and_accumulation_given_directly():
    """The rule picks the microbatch and the accumulation: the run equals one given both."""
    bounded = train(TrainConfig(**SMALL, weights="stash", stages="3", max_stale_samples=40), progress=False)
    direct = train(TrainConfig(**{**SMALL, "batch_size": 8}, weights="stash", stages="3",
                               compensation=["accumulate:every=4"]), progress=False)
    # 40 // 4 = 10 samples allowed: the largest divisor of 32 within it is 8, 4 per update
    assert bounded.delays == [4, 2, 0] and bounded.microbatch == direct.microbatch == 8 and bounded.accumulation == 4
    assert bounded.test_loss == direct.test_loss
    assert [r["train_loss"] for r in bounded.history] == [r["train_loss"] for r in direct.history]
    plain = train(TrainConfig(**{**SMALL, "batch_size": 8}, weights="stash", stages="3"), progress=False)
    assert plain.test_loss != bounded.test_loss  # the accumulation is part of it
    # the sum lives in .grad: no more history than the same run without accumulation, from the
    # start (ema holds its buffer from construction on; a sum made then would show in the peak)
    ema_runs = [train(TrainConfig(**{**SMALL, "epochs": 1, **kw}, weights="ema", stages="3"), progress=False)
                for kw in ({"max_stale_samples": 40}, {"batch_size": 8})]
    assert ema_runs[0].accumulation == 4 and ema_runs[1].accumulation == 1
    assert ema_runs[0].weight_history_bytes == ema_runs[1].weight_history_bytes
    sync = train(TrainConfig(**SMALL, weights="sync", stages="3", max_stale_samples=40), progress=False)
    assert sync.microbatch == 32 and sync.accumulation == 1  # no delay, nothing stale: the batch as given


def test_resume_refuses_another_staleness_bound():
    from layerpipe.errors import LayerpipeError
    from layerpipe.training import check_checkpoint_config

    saved = TrainConfig(**SMALL, max_stale_samples=40).to_dict()
    with pytest.raises(LayerpipeError, match="max_stale_samples=40"):
        check_checkpoint_config({"config": saved}, TrainConfig(**SMALL), "the checkpoint")
    del saved["max_stale_samples"]  # a checkpoint from before the setting: the microbatch at every depth
    check_checkpoint_config({"config": saved}, TrainConfig(**SMALL), "the checkpoint")
