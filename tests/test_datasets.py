"""Datasets: reference generators, splits, check values, random labels, MNIST/CIFAR loaders."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from hbkernels.boundary.datasets import (
    Dataset,
    list_datasets,
    load_dataset,
    read_idx,
    reference_split,
)

# name -> (train, test, val, classes, input shape)
EXPECTED = {
    "gauss": (150, 60, 90, 3, (2,)),
    "hierarchical": (150, 60, 90, 4, (2,)),
    "hierarchical-2": (150, 60, 90, 2, (2,)),
    "circle": (100, 40, 60, 2, (2,)),
    "half-moon": (100, 40, 60, 2, (2,)),
    "checkerboard-linear": (200, 80, 120, 2, (2,)),
    "checkerboard-noisy": (200, 80, 120, 2, (2,)),
    "intro": (6, 6, 6, 2, (1,)),
    "iris": (120, 30, 0, 3, (4,)),
    "digits": (898, 359, 540, 10, (1, 8, 8)),
    "digits-017": (267, 106, 161, 3, (1, 8, 8)),
    "digits-0179": (356, 142, 214, 4, (1, 8, 8)),
}
OFFLINE = [n for n in list_datasets() if not n.startswith(("mnist", "cifar"))]


def unsplit(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset in generation order (inverts the reference split; not for intro)."""
    X = torch.cat([ds.X_train, ds.X_test, ds.X_val])
    y = torch.cat([ds.y_train, ds.y_test, ds.y_val])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
    Xf, yf = torch.empty_like(X), torch.empty_like(y)
    Xf[perm], yf[perm] = X, y
    return Xf, yf


@pytest.mark.parametrize("name", OFFLINE)
def test_every_offline_dataset_loads_with_valid_labels(name):
    ds = load_dataset(name)
    for X, y in (ds.train_data(), ds.test_data(), ds.val_data()):
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert len(X) == len(y)
        if len(y):
            assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes
            assert torch.isfinite(X).all()
    assert not ds.random_labels
    assert torch.bincount(ds.y_train, minlength=ds.num_classes).min() > 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_split_sizes_classes_and_shapes(name):
    ds = load_dataset(name)
    n_tr, n_te, n_va, c, shape = EXPECTED[name]
    assert (len(ds.y_train), len(ds.y_test), len(ds.y_val)) == (n_tr, n_te, n_va)
    assert ds.num_classes == c and ds.input_shape == shape
    info = ds.info()
    assert info["sizes"] == {"train": n_tr, "test": n_te, "val": n_va}
    assert sum(info["train_class_counts"]) == n_tr


def test_reference_split_rule():
    tr, te, va = reference_split(300, 0.5, 0.2)
    assert torch.equal(tr[:5], torch.tensor([42, 61, 286, 160, 30]))  # measured with torch 2.13
    assert (len(tr), len(te), len(va)) == (150, 60, 90)
    assert torch.equal(torch.sort(torch.cat([tr, te, va])).values, torch.arange(300))
    tr, te, va = reference_split(6, 1.0, 0.0)  # intro: everything, unshuffled
    assert all(torch.equal(t, torch.arange(6)) for t in (tr, te, va))
    tr, te, va = reference_split(150, 0.8, 0.2)
    assert (len(tr), len(te), len(va)) == (120, 30, 0)
    with pytest.raises(ValueError, match="hbk.reference_split: expected fractions"):
        reference_split(10, 0.9, 0.2)


def test_gauss_reference_check_values():
    ds = load_dataset("gauss")
    X, y = unsplit(ds)
    expected = torch.tensor([[2.2484, -1.0691], [2.3238, -0.2385], [1.8829, -1.1171]])
    torch.testing.assert_close(X[:3], expected, atol=1e-4, rtol=0)
    assert torch.equal(y, torch.arange(3).repeat_interleave(100))
    means = torch.stack([X[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(means, torch.tensor([[1.94, -0.98], [-1.94, 0.04], [-0.02, 1.94]]),
                               atol=6e-3, rtol=0)
    assert torch.bincount(ds.y_train).tolist() == [54, 49, 47]
    assert ds.extent == (-4.0, 4.0, -4.0, 4.0)


def test_circle_and_half_moon_first_samples():
    Xc, yc = unsplit(load_dataset("circle"))
    torch.testing.assert_close(Xc[0], torch.tensor([-0.5187, -0.8381]), atol=1e-4, rtol=0)
    assert torch.bincount(yc).tolist() == [100, 100]
    Xm, _ = unsplit(load_dataset("half-moon"))
    torch.testing.assert_close(Xm[0], torch.tensor([-0.5641, 0.8879]), atol=1e-4, rtol=0)
    assert -1.3 < float(Xm[:, 0].min()) and float(Xm[:, 0].max()) < 2.2
    assert load_dataset("half-moon").extent == (-1.7, 2.3, -1.7, 2.3)


def test_checkerboard_noisy_is_linear_shifted():
    Xl, yl = unsplit(load_dataset("checkerboard-linear"))
    Xn, yn = unsplit(load_dataset("checkerboard-noisy"))
    assert torch.equal(yl, yn)
    shift = torch.where(yl == 0, -0.3, 0.3)
    torch.testing.assert_close(Xn[:, 0], Xl[:, 0] + shift, atol=1e-6, rtol=0)
    assert torch.equal(Xn[:, 1], Xl[:, 1])
    # x = 0 separates the linear data perfectly and 96.25 % of the noisy data (reference)
    assert float(((Xl[:, 0] < 0).long() == yl).double().mean()) == 1.0
    assert float(((Xn[:, 0] < 0).long() == yn).double().mean()) == pytest.approx(0.9625)
    blob_y = Xl[:, 1].reshape(4, 100).mean(1)
    torch.testing.assert_close(blob_y, torch.tensor([-3.0, 1.0, -1.0, 3.0]), atol=0.03, rtol=0)


def test_hierarchical_variants():
    X4, y4 = unsplit(load_dataset("hierarchical"))
    X2, y2 = unsplit(load_dataset("hierarchical-2"))
    assert torch.equal(X4, X2) and torch.equal(y2, y4 // 2)
    assert torch.bincount(y4).tolist() == [75] * 4
    means = torch.stack([X4[y4 == c].mean(0) for c in range(4)])
    # 75 samples with std 0.55: standard error 0.064, allow 4 of them
    torch.testing.assert_close(means, torch.tensor([[2.0, -1], [2, 1], [-2, 1], [-2, -1]]),
                               atol=0.26, rtol=0)


def test_intro_and_iris():
    ds = load_dataset("intro")
    expected_x = torch.tensor([[0.5], [1.0], [1.1], [1.3], [1.4], [1.45]])
    for X, y in (ds.train_data(), ds.test_data(), ds.val_data()):
        torch.testing.assert_close(X, expected_x)
        assert y.tolist() == [0, 1, 1, 1, 0, 0]
    iris = load_dataset("iris")
    assert len(iris.y_val) == 0 and iris.X_val.shape == (0, 4)
    X, y = unsplit(iris)
    from sklearn.datasets import load_iris

    torch.testing.assert_close(X, torch.tensor(load_iris().data, dtype=torch.float32))


def test_digits_scaling_and_subsets():
    from sklearn.datasets import load_digits

    raw = load_digits()
    full = load_dataset("digits")
    X, y = unsplit(full)
    torch.testing.assert_close(X[:, 0], torch.tensor(raw.images / 16.0, dtype=torch.float32))
    assert float(X.max()) == 1.0 and float(X.min()) == 0.0
    sub = load_dataset("digits-71", per_class=20)
    Xs, ys = unsplit(sub)
    # first 20 sevens (label 0), then first 20 ones (label 1), in dataset order
    sevens = np.flatnonzero(raw.target == 7)[:20]
    ones = np.flatnonzero(raw.target == 1)[:20]
    expect = torch.tensor(raw.images[np.concatenate([sevens, ones])] / 16.0, dtype=torch.float32)
    torch.testing.assert_close(Xs[:, 0], expect)
    assert ys.tolist() == [0] * 20 + [1] * 20
    # default per class: the reference 300 capped at the smallest class (178 zeros)
    d017 = load_dataset("digits-017")
    assert len(d017.y_train) + len(d017.y_test) + len(d017.y_val) == 3 * 178
    with pytest.raises(ValueError, match="expected at least 500 images of class 0"):
        load_dataset("digits-01", per_class=500)


@pytest.mark.parametrize("name", OFFLINE)
def test_random_labels_keep_inputs_and_class_counts(name):
    true, rand = load_dataset(name), load_dataset(name, random_labels=True)
    assert rand.random_labels and rand.random_type == "uniform"
    if name == "intro":
        Xt, yt, Xr, yr = true.X_train, true.y_train, rand.X_train, rand.y_train
    else:
        (Xt, yt), (Xr, yr) = unsplit(true), unsplit(rand)
    assert torch.equal(Xt, Xr)
    assert torch.equal(torch.bincount(yt), torch.bincount(yr))
    assert not torch.equal(yt, yr)


def test_random_label_reference_permutation():
    _, y = unsplit(load_dataset("gauss"))
    _, yr = unsplit(load_dataset("gauss", random_labels=True))
    expect = np.random.RandomState(28).permutation(y.numpy())
    assert yr.tolist() == expect.tolist()
    assert float((y == yr).double().mean()) == pytest.approx(0.343, abs=1e-3)  # reference
    _, yh = unsplit(load_dataset("hierarchical"))
    _, yhr = unsplit(load_dataset("hierarchical", random_labels=True))
    assert yhr.tolist() == np.random.RandomState(34).permutation(yh.numpy()).tolist()


def test_hierarchical_within_permutes_inside_groups():
    _, y = unsplit(load_dataset("hierarchical"))
    _, yw = unsplit(load_dataset("hierarchical", random_labels=True, random_type="within"))
    assert torch.equal(y // 2, yw // 2) and not torch.equal(y, yw)
    assert torch.equal(torch.bincount(y), torch.bincount(yw))
    with pytest.raises(ValueError, match="random_type='within' only with 'hierarchical'"):
        load_dataset("gauss", random_labels=True, random_type="within")


def test_determinism_split_seed_and_dtype():
    a, b = load_dataset("half-moon"), load_dataset("half-moon")
    for f in ("X_train", "y_train", "X_test", "y_test", "X_val", "y_val"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = load_dataset("half-moon", split_seed=7)
    assert not torch.equal(a.X_train, c.X_train)
    d = load_dataset("half-moon", dtype=torch.float64)
    assert d.X_train.dtype == torch.float64 and d.y_train.dtype == torch.int64
    torch.testing.assert_close(d.X_train.float(), a.X_train)
    e = a.to(torch.float64)
    assert e.X_val.dtype == torch.float64 and a.X_val.dtype == torch.float32
    assert "half-moon" in repr(a) and "train=100" in repr(a)


def test_errors():
    with pytest.raises(ValueError, match="hbk.load_dataset: expected a dataset name, one of gauss"):
        load_dataset("gaussian")
    with pytest.raises(TypeError, match="hbk.load_dataset: expected a dataset name"):
        load_dataset(3)
    with pytest.raises(ValueError, match="distinct class digits"):
        load_dataset("mnist-")
    with pytest.raises(TypeError, match="hbk.load_dataset: expected a floating torch.dtype"):
        load_dataset("gauss", dtype=torch.int64)
    with pytest.raises(ValueError, match="distinct class digits"):
        load_dataset("digits-011")
    with pytest.raises(ValueError, match="per_class/pool only for image subsets"):
        load_dataset("gauss", per_class=3)
    with pytest.raises(TypeError, match="hbk.Dataset.to"):
        load_dataset("gauss").to(torch.int32)


# ----------------------------------------------------------------------------------------------
# MNIST / CIFAR-10 loaders on tiny files


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(directory, prefix: str, per_digit: int, compress: bool, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), per_digit)  # 0..9, 0..9, ... (interleaved order)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    files = ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels))
    for name, arr in files:
        data = _idx_bytes(arr)
        if compress:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


def test_mnist_idx_loader(tmp_path):
    images, labels = _write_mnist(tmp_path, "t10k", 6, compress=True, seed=0)
    assert np.array_equal(read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), labels)
    ds = load_dataset("mnist-017", root=tmp_path, per_class=5)
    assert ds.name == "mnist-017" and ds.num_classes == 3 and ds.input_shape == (1, 28, 28)
    n = 15
    assert (len(ds.y_train), len(ds.y_test), len(ds.y_val)) == (int(0.5 * n), int(0.2 * n),
                                                                n - int(0.5 * n) - int(0.2 * n))
    X, y = unsplit(ds)
    order = np.concatenate([np.flatnonzero(labels == c)[:5] for c in (0, 1, 7)])
    torch.testing.assert_close(X[:, 0], torch.tensor(images[order] / 255.0, dtype=torch.float32))
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    # random labels: torch.randperm under a generator seeded 28, before the split
    _, yr = unsplit(load_dataset("mnist-017", root=tmp_path, per_class=5, random_labels=True))
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(28))
    assert torch.equal(yr, y[perm])
    # the default per-class count (300) is more than the file has
    with pytest.raises(ValueError, match="expected at least 300 images of class 0"):
        load_dataset("mnist-017", root=tmp_path)


def test_mnist_train_pool_plain_files_and_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = _write_mnist(raw, "train", 3, compress=False, seed=1)
    ds = load_dataset("mnist", root=tmp_path, per_class=2)  # all 10 classes: the train pool
    assert ds.num_classes == 10 and len(ds.y_train) + len(ds.y_test) + len(ds.y_val) == 20
    assert "mnist" in list_datasets(available_only=True, root=tmp_path)
    assert "mnist-017" not in list_datasets(available_only=True, root=tmp_path)  # no t10k files
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        load_dataset("mnist-017", root=tmp_path, per_class=2)


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*optionally \.gz"):
        load_dataset("mnist-017", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2"):
        load_dataset("cifar", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar-127", root=tmp_path)
    assert list_datasets(available_only=True, root=tmp_path) == OFFLINE


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="hbk.read_idx: expected an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 2)))[:-1])
    with pytest.raises(ValueError, match="expected 8 data bytes"):
        read_idx(tmp_path / "short")


def _cifar_images(labels: np.ndarray, offset: int) -> np.ndarray:
    """(N, 32, 32, 3) HWC images whose pixels encode (image, channel, row, column)."""
    n = len(labels)
    i, r, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), indexing="ij")
    chans = [(7 * (i + offset) + r) % 256, (3 * c + 5) % 256, (r * 2 + c) % 256]
    return np.stack(chans, axis=-1).astype(np.uint8)


def _write_cifar_batch(path, images_hwc: np.ndarray, labels: np.ndarray) -> None:
    # The official layout: each row is the R plane, the G plane, the B plane (each 32x32).
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels.tolist()}, f)


def test_cifar_loader_orientation_scaling_and_subsets(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    test_labels = np.tile(np.arange(10), 4)
    test_hwc = _cifar_images(test_labels, 0)
    _write_cifar_batch(d / "test_batch", test_hwc, test_labels)
    ds = load_dataset("cifar-127", root=tmp_path, per_class=3)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 3
    X, y = unsplit(ds)
    order = np.concatenate([np.flatnonzero(test_labels == c)[:3] for c in (1, 2, 7)])
    expect = torch.tensor(test_hwc[order].transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    torch.testing.assert_close(X, expect)  # channel-first, rows stay rows (not transposed)
    assert not torch.equal(X, expect.transpose(2, 3))
    assert y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert (len(ds.y_train), len(ds.y_test), len(ds.y_val)) == (6, 1, 2)  # 0.7 / 0.2 split
    # all 10 classes come from the train batches, in batch order
    labels = [np.tile(np.arange(10), 2) for _ in range(5)]
    for b in range(5):
        _write_cifar_batch(d / f"data_batch_{b + 1}", _cifar_images(labels[b], 100 * b), labels[b])
    full = load_dataset("cifar", root=tmp_path, per_class=7)
    Xf, yf = unsplit(full)
    assert full.num_classes == 10 and len(yf) == 70
    first_of_9 = _cifar_images(labels[0], 0)[9].transpose(2, 0, 1) / 255.0
    torch.testing.assert_close(Xf[63], torch.tensor(first_of_9, dtype=torch.float32))
    assert list_datasets(available_only=True, root=tmp_path)[-2:] == ["cifar-127", "cifar"]


def test_check_dataset_name_lists_the_choices():
    from hbkernels.boundary.datasets import check_dataset_name

    for ok in ("gauss", "half-moon", "digits", "digits-017", "mnist", "mnist-1379", "cifar-127"):
        assert check_dataset_name("hbk.t", ok) == ok
    for bad in ("nope", "gaussian", "mnist-x", "digits-11", "cifar-", "Gauss"):
        with pytest.raises(ValueError, match=r"hbk.t: expected (a dataset name, one of gauss, "
                                             r"hierarchical.*|distinct class digits.*)got "):
            check_dataset_name("hbk.t", bad)
    with pytest.raises(TypeError, match="hbk.t: expected a dataset name"):
        check_dataset_name("hbk.t", None)


def test_flags_are_real_bools():
    with pytest.raises(TypeError,
                       match="hbk.load_dataset: expected random_labels to be True or False"):
        load_dataset("gauss", random_labels="False")
    with pytest.raises(ValueError, match="hbk.load_dataset: expected split_seed >= 0"):
        load_dataset("gauss", split_seed=-1)
