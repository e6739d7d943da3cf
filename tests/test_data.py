"""Offline datasets: MNIST-1D generation and cache, digits, CIFAR pickles (written here as
tiny fakes), the stdlib byte corpus, and the losses."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import layerpipe.data.mnist1d as mnist1d_module
from layerpipe.data import DATASET_NAMES, Dataset, accuracy, load_dataset, loss_fn
from layerpipe.errors import DataError, LayerpipeError


def test_dataset_names_are_the_contract():
    assert DATASET_NAMES == ("mnist1d", "digits", "cifar10", "cifar100", "text")


def test_unknown_dataset():
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'.*mnist1d, digits, cifar10, cifar100, text"):
        load_dataset("svhn")
    assert issubclass(DataError, LayerpipeError)


# ---- MNIST-1D -------------------------------------------------------------------------


def test_mnist1d_is_cached_and_loads_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPIPE_CACHE", str(tmp_path))
    r, n = random.getstate(), np.random.get_state()
    a = load_dataset("mnist1d", samples=200, seed=3)
    assert random.getstate() == r and np.array_equal(np.random.get_state()[1], n[1])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["mnist1d-n200-seed3-v1.npz"]  # no temporary file left behind

    def no_generation(*args, **kwargs):
        raise AssertionError("the second load should hit the cache")

    monkeypatch.setattr(mnist1d_module, "_generate", no_generation)
    b = load_dataset("mnist1d", samples=200, seed=3)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.input_shape == (40,) and a.num_classes == 10 and a.task == "classification"
    assert set(a.y_train.tolist()) <= set(range(10))


def test_mnist1d_seed_changes_the_data_and_corrupt_cache_is_rebuilt(tmp_path):
    a = load_dataset("mnist1d", samples=100, seed=0, cache_dir=str(tmp_path))
    b = load_dataset("mnist1d", samples=100, seed=1, cache_dir=str(tmp_path))
    assert not torch.equal(a.x_train, b.x_train)
    path = tmp_path / "mnist1d-n100-seed0-v1.npz"
    path.write_bytes(b"not a zip file")
    c = load_dataset("mnist1d", samples=100, seed=0, cache_dir=str(tmp_path))
    assert torch.equal(a.x_train, c.x_train)
    assert np.load(path)["x_train"].shape == (80, 40)  # rewritten


def test_mnist1d_default_split(tmp_path):
    ds = load_dataset("mnist1d", cache_dir=str(tmp_path))
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert abs(float(ds.x_train.mean())) < 0.05 and abs(float(ds.x_train.std()) - 1) < 0.05


def test_mnist1d_too_few_samples(tmp_path):
    with pytest.raises(DataError, match="at least 10 samples"):
        load_dataset("mnist1d", samples=5, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="positive"):
        load_dataset("mnist1d", samples=0, cache_dir=str(tmp_path))


# ---- digits ---------------------------------------------------------------------------


def test_digits():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (64,) and ds.num_classes == 10
    assert abs(float(ds.x_train.mean())) < 1e-3
    again = load_dataset("digits")
    assert torch.equal(ds.x_test, again.x_test)
    assert not torch.equal(load_dataset("digits", seed=1).y_test, ds.y_test)
    assert load_dataset("digits", samples=100).x_train.shape == (100, 64)


# ---- CIFAR ----------------------------------------------------------------------------


def _write_batch(path: Path, n: int, label_key: str, classes: int, seed: int, byte_keys: bool) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
        "batch_label": "fake",
    }
    if byte_keys:  # what Python 2 pickles look like when loaded with encoding="bytes"
        batch = {k.encode(): v for k, v in batch.items()}
    path.write_bytes(pickle.dumps(batch))


def fake_cifar10(root: Path, byte_keys: bool = True) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", 4, "labels", 10, i, byte_keys)
    _write_batch(folder / "test_batch", 3, "labels", 10, 0, byte_keys)
    return folder


def fake_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _write_batch(folder / "train", 6, "fine_labels", 100, 1, False)
    _write_batch(folder / "test", 2, "fine_labels", 100, 2, False)
    return folder


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_from_parent_or_folder(tmp_path, point_at):
    folder = fake_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=str(tmp_path if point_at == "parent" else folder))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    # pixel 0 of image 0, channel 0, normalised with the CIFAR-10 statistics
    raw = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")[b"data"][0, 0]
    assert float(ds.x_train[0, 0, 0, 0]) == pytest.approx((raw / 255 - 0.4914) / 0.2470, rel=1e-5)
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")[b"labels"]
    assert ds.y_train[:4].tolist() == first


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar100_fine_labels(tmp_path, point_at):
    folder = fake_cifar100(tmp_path)
    ds = load_dataset("cifar100", data_dir=str(tmp_path if point_at == "parent" else folder))
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.num_classes == 100
    labels = pickle.loads((folder / "train").read_bytes())["fine_labels"]
    assert ds.y_train.tolist() == labels


def test_cifar_samples_limits_the_training_set(tmp_path):
    fake_cifar10(tmp_path, byte_keys=False)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), samples=7)
    assert ds.x_train.shape[0] == 7 and ds.x_test.shape[0] == 3
    again = load_dataset("cifar10", data_dir=str(tmp_path), samples=7)
    assert torch.equal(ds.x_train, again.x_train)


def test_cifar_missing_folder_names_the_expected_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert f"CIFAR-10 not found: expected {tmp_path / 'cifar-10-batches-py' / 'data_batch_1'}" in message
    assert "cifar-10-python.tar.gz" in message and "--data-dir" in message
    with pytest.raises(DataError, match=r"CIFAR-100 not found: expected .*cifar-100-python/train"):
        load_dataset("cifar100", data_dir=str(tmp_path))


def test_cifar_missing_single_file(tmp_path):
    folder = fake_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=r"expected .*cifar-10-batches-py/test_batch \("):
        load_dataset("cifar10", data_dir=str(tmp_path))
    folder100 = fake_cifar100(tmp_path)
    (folder100 / "test").unlink()
    with pytest.raises(DataError, match=r"expected .*cifar-100-python/test \("):
        load_dataset("cifar100", data_dir=str(folder100))


@pytest.mark.parametrize(
    "content",
    [
        b"\x80\x04garbage",  # not a pickle
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:40],  # truncated
        pickle.dumps([1, 2, 3]),  # not a dict
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),  # wrong shape
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}),  # no labels
    ],
)
def test_cifar_corrupt_pickle(tmp_path, content):
    folder = fake_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(content)
    with pytest.raises(DataError, match=r"CIFAR-10 file is corrupt: .*data_batch_3") as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "\n" not in str(err.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch evil-was-run",))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = fake_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="corrupt.*data_batch_2"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert not (tmp_path / "evil-was-run").exists()


def test_cifar_labels_out_of_range(tmp_path):
    folder = fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}))
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# ---- text -----------------------------------------------------------------------------


def test_text_windows_shift_by_one():
    ds = load_dataset("text", samples=50, seq_len=32)
    assert ds.task == "language" and ds.num_classes == 256 and ds.input_shape == (32,)
    assert ds.x_train.shape == (45, 32) and ds.x_test.shape == (5, 32)
    assert ds.x_train.dtype == torch.int64 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.y_train[:, :-1], ds.x_train[:, 1:])
    assert torch.equal(ds.y_train[:-1, -1], ds.x_train[1:, 0])  # windows are contiguous
    assert torch.equal(ds.y_test[:, :-1], ds.x_test[:, 1:])
    assert int(ds.x_train.min()) >= 0 and int(ds.x_train.max()) < 256
    again = load_dataset("text", samples=50, seq_len=32)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    # validation continues where training stopped
    assert ds.x_test[0, 0] == ds.y_train[-1, -1]


def test_text_default_budget_and_real_source():
    ds = load_dataset("text")
    assert ds.x_train.shape[1] == 128
    total = (ds.x_train.numel() + ds.x_test.numel())
    assert 0.95 * 2 * 1024 * 1024 < total <= 2 * 1024 * 1024
    text = bytes(ds.x_train[:4].flatten().tolist()).decode("utf-8", errors="replace")
    assert "def " in text or "import" in text or '"""' in text


def test_text_too_small(tmp_path):
    from layerpipe.data.text import load_text

    (tmp_path / "a.py").write_bytes(b"x = 1\n")
    with pytest.raises(DataError, match="text corpus too small"):
        load_text(seq_len=128, root=tmp_path)


# ---- losses ---------------------------------------------------------------------------


def test_loss_functions():
    out, target = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert torch.equal(loss_fn("classification")(out, target), F.cross_entropy(out, target))
    logits, seq = torch.randn(2, 5, 256), torch.randint(0, 256, (2, 5))
    expected = torch.stack([F.cross_entropy(logits[b], seq[b], reduction="none") for b in range(2)]).mean()
    torch.testing.assert_close(loss_fn("language")(logits, seq), expected)
    ds = Dataset("x", out, target, out, target, 10, (10,), "language")
    assert loss_fn(ds) is loss_fn("language")
    with pytest.raises(DataError, match="unknown task"):
        loss_fn("regression")
    assert accuracy(torch.eye(3), torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
