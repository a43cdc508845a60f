"""The paper's datasets with the reference generators, splits and random-label variants.

Every dataset is built exactly as the reference code builds it (``reference_setup.md``
section 1) and split with the reference rule: ``train = int(f_train * n)``,
``test = int(f_test * n)``, ``val = n - train - test``, indices from ``torch.randperm(n)``
under a generator seeded 42, chunks in the order [train, test, val].

Synthetic 2-D data, the 1-D intro toy, Iris and the 8x8 digits are generated or loaded
offline (Iris and digits from the copies bundled with scikit-learn). MNIST and CIFAR-10 are
read from files in a directory (``root``; default ``$HBK_DATA`` or ``./datasets``); nothing is
ever downloaded.

Deliberate differences from the reference code (its bugs, ``reference_setup.md`` 10.3):
image pixels are scaled to [0, 1] (MNIST and CIFAR-10 divided by 255, digits by 16) instead
of staying raw, and CIFAR-10 images keep their orientation (channel-first (3, H, W), not the
transposed (3, W, H)).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from ..checks import check_bool, check_int

__all__ = [
    "Dataset",
    "check_dataset_name",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "reference_split",
]

_SPLIT_SEED = 42
_RANDOM_LABEL_SEED = 28
_HIERARCHICAL_SEED = 34

# name -> (train fraction, test fraction, plot extent)
_SYNTHETIC: dict[str, tuple[float, float, tuple[float, float, float, float] | None]] = {
    "gauss": (0.5, 0.2, (-4.0, 4.0, -4.0, 4.0)),
    "hierarchical": (0.5, 0.2, (-4.0, 4.0, -4.0, 4.0)),
    "hierarchical-2": (0.5, 0.2, (-4.0, 4.0, -4.0, 4.0)),
    "circle": (0.5, 0.2, (-2.0, 2.0, -2.0, 2.0)),
    "half-moon": (0.5, 0.2, (-1.7, 2.3, -1.7, 2.3)),
    "checkerboard-linear": (0.5, 0.2, (-3.0, 3.0, -4.0, 4.0)),
    "checkerboard-noisy": (0.5, 0.2, (-3.0, 3.0, -4.0, 4.0)),
    "intro": (1.0, 0.0, None),
    "iris": (0.8, 0.2, None),
    "digits": (0.5, 0.2, None),
}
_IMAGE_FRACTIONS = {"digits": (0.5, 0.2), "mnist": (0.5, 0.2), "cifar": (0.7, 0.2)}
# The reference subsets' samples per class: c017/c179 x300, c0179/c1379 x200, c10 x1000 (MNIST);
# CIFAR c127 and c10 x1000.
_CIFAR_PER_CLASS = 1000
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


@dataclass(repr=False)
class Dataset:
    """A split classification dataset.

    Attributes:
        name: canonical name, e.g. ``"gauss"`` or ``"mnist-017"``.
        X_train, X_test, X_val: inputs ``(n_split, *input_shape)``, float (float32 by default).
        y_train, y_test, y_val: int64 labels ``(n_split,)`` in ``0 .. num_classes - 1``.
        num_classes: number of classes C.
        extent: ``(xmin, xmax, ymin, ymax)`` plot box of the reference figures for 2-D data,
            else None.
        random_labels: True when the labels were permuted (the reference random-label setup;
            test and validation labels are permuted too, so their accuracies mean nothing).
        random_type: ``"uniform"`` or ``"within"`` (hierarchical only) for random labels, else
            None.
        source: how the data were made (generator, seeds, scaling).
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    extent: tuple[float, float, float, float] | None = None
    random_labels: bool = False
    random_type: str | None = None
    source: str = field(default="")

    def to(self, dtype: torch.dtype) -> Dataset:
        """A copy with the inputs cast to a floating ``dtype`` (labels stay int64)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"hbk.Dataset.to: expected a floating torch.dtype, got {dtype!r}")
        return replace(
            self,
            X_train=self.X_train.to(dtype),
            X_test=self.X_test.to(dtype),
            X_val=self.X_val.to(dtype),
        )

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_train, y_train)``, the data of the training loss and its Hessian."""
        return self.X_train, self.y_train

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_test, y_test)``."""
        return self.X_test, self.y_test

    def val_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_val, y_val)`` (empty for Iris, as in the reference split)."""
        return self.X_val, self.y_val

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(2,)`` or ``(1, 28, 28)``."""
        return tuple(self.X_train.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the inputs."""
        return self.X_train.dtype

    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary: name, sizes, class counts, flags."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "sizes": {"train": len(self.y_train), "test": len(self.y_test), "val": len(self.y_val)},
            "train_class_counts": torch.bincount(self.y_train, minlength=self.num_classes).tolist(),
            "extent": list(self.extent) if self.extent is not None else None,
            "random_labels": self.random_labels,
            "random_type": self.random_type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "source": self.source,
        }

    def __repr__(self) -> str:
        s = self.info()["sizes"]
        return (
            f"Dataset({self.name!r}, train={s['train']}, test={s['test']}, val={s['val']}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"random_labels={self.random_labels})"
        )


# ----------------------------------------------------------------------------------------------
# split and labels


def reference_split(
    n: int, train_fraction: float, test_fraction: float, seed: int = _SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference train/test/val split of ``n`` items.

    ``train = int(train_fraction * n)``, ``test = int(test_fraction * n)``, ``val`` the rest;
    the indices are ``torch.randperm(n)`` under a generator seeded ``seed``, chunked in the
    order [train, test, val]. When ``test_fraction == 0`` (the intro toy) train, test and val
    are all ``n`` items, unshuffled, as in the reference.

    Args:
        n: number of items.
        train_fraction: fraction in [0, 1].
        test_fraction: fraction in [0, 1], ``train_fraction + test_fraction <= 1``.
        seed: generator seed (the reference uses 42).

    Returns:
        ``(train_idx, test_idx, val_idx)`` int64 index tensors.
    """
    if not (0 <= train_fraction <= 1 and 0 <= test_fraction <= 1
            and train_fraction + test_fraction <= 1 + 1e-12):
        raise ValueError(
            "hbk.reference_split: expected fractions in [0, 1] summing to at most 1, got "
            f"train={train_fraction}, test={test_fraction}"
        )
    if test_fraction == 0:
        idx = torch.arange(n)
        return idx, idx.clone(), idx.clone()
    n_train, n_test = int(train_fraction * n), int(test_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train : n_train + n_test], perm[n_train + n_test :]


def _permute_numpy(y: np.ndarray, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).permutation(y)


def _permute_within(y: np.ndarray, groups: tuple[tuple[int, ...], ...], seed: int) -> np.ndarray:
    """Permute labels inside each group of classes (one RandomState, groups in order)."""
    rs = np.random.RandomState(seed)
    out = y.copy()
    for group in groups:
        where = np.flatnonzero(np.isin(y, group))
        out[where] = rs.permutation(y[where])
    return out


# ----------------------------------------------------------------------------------------------
# generators of the synthetic data (numpy arrays; labels as class blocks)


def _gaussian_blobs(
    rs: np.random.RandomState, means: list, stds: list, per_blob: int
) -> np.ndarray:
    # One normal(mean, std) call per sample draws x then y: the same stream as size=(n, 2).
    return np.concatenate(
        [rs.normal(np.asarray(m, float), np.asarray(s, float), size=(per_blob, 2))
         for m, s in zip(means, stds)]
    )


def _gauss() -> tuple[np.ndarray, np.ndarray]:
    means = [(2, -1), (-2, 0), (0, 2)]
    stds = [(0.5, 0.5), (0.5, 1.0), (0.5, 0.5)]
    X = _gaussian_blobs(np.random.RandomState(42), means, stds, 300 // 3)
    return X, np.repeat(np.arange(3), 100)


def _hierarchical() -> tuple[np.ndarray, np.ndarray]:
    means = [(2, -1), (2, 1), (-2, 1), (-2, -1)]
    X = _gaussian_blobs(np.random.RandomState(_HIERARCHICAL_SEED), means, [(0.5, 0.55)] * 4, 75)
    return X, np.repeat(np.arange(4), 75)


def _circle() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_circles

    return make_circles(n_samples=200, shuffle=True, noise=0.1, random_state=28, factor=0.5)


def _half_moon() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=200, shuffle=True, noise=0.1, random_state=28)


def _checkerboard(x_mean: float) -> tuple[np.ndarray, np.ndarray]:
    means = [(x_mean, -3), (x_mean, 1), (-x_mean, -1), (-x_mean, 3)]
    X = _gaussian_blobs(np.random.RandomState(41), means, [(0.3, 0.1)] * 4, 100)
    return X, np.repeat(np.arange(2), 200)


def _intro() -> tuple[np.ndarray, np.ndarray]:
    X = np.array([0.5, 1.0, 1.1, 1.3, 1.4, 1.45]).reshape(6, 1)
    return X, np.array([0, 1, 1, 1, 0, 0])


def _iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    d = load_iris()
    return d.data, d.target


_GENERATORS: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], str]] = {
    "gauss": (_gauss, "3 Gaussians, 100/class, numpy RandomState(42)"),
    "hierarchical": (_hierarchical, "4 Gaussians, 75/class, numpy RandomState(34)"),
    "hierarchical-2": (_hierarchical, "hierarchical with classes {0,1}->0, {2,3}->1"),
    "circle": (_circle, "sklearn make_circles(200, noise=0.1, factor=0.5, random_state=28)"),
    "half-moon": (_half_moon, "sklearn make_moons(200, noise=0.1, random_state=28)"),
    "checkerboard-linear": (lambda: _checkerboard(0.8), "4 blobs x=+-0.8, RandomState(41)"),
    "checkerboard-noisy": (lambda: _checkerboard(0.5), "4 blobs x=+-0.5, RandomState(41)"),
    "intro": (_intro, "the 6-point 1-D toy of the paper's Fig. 1"),
    "iris": (_iris, "sklearn load_iris, unnormalised"),
}


# ----------------------------------------------------------------------------------------------
# image data


def _parse_classes(name: str, spec: str) -> list[int]:
    if not spec.isdigit() or len(set(spec)) != len(spec):
        raise ValueError(
            f"hbk.load_dataset: expected distinct class digits after '-' (e.g. 'mnist-017'), "
            f"got {name!r}"
        )
    return [int(c) for c in spec]


def _first_per_class(
    y: np.ndarray, classes: list[int], per_class: int, what: str
) -> np.ndarray:
    """Indices of the first ``per_class`` items of each class, class by class in list order."""
    chunks = []
    for c in classes:
        where = np.flatnonzero(y == c)
        if len(where) < per_class:
            raise ValueError(
                f"hbk.load_dataset: expected at least {per_class} {what} of class {c}, "
                f"got {len(where)}"
            )
        chunks.append(where[:per_class])
    return np.concatenate(chunks)


def _find_files(
    root: Path, subdirs: tuple[str, ...], names: tuple[str, ...], what: str, gz: bool
) -> list[Path]:
    dirs = [root] + [root / s for s in subdirs]
    for d in dirs:
        found = []
        for n in names:
            options = [d / n] + ([d / (n + ".gz")] if gz else [])
            hit = next((p for p in options if p.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    shown = ", ".join(names) + (" (optionally .gz)" if gz else "")
    raise FileNotFoundError(
        f"hbk.load_dataset: expected the {what} files {shown} in one of "
        f"{', '.join(str(d) for d in dirs)}; nothing is downloaded, put them there or pass root=..."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    Args:
        path: e.g. ``t10k-images-idx3-ubyte`` or ``t10k-images-idx3-ubyte.gz``.

    Returns:
        uint8 array of the stored shape, e.g. ``(N, 28, 28)`` for images, ``(N,)`` for labels.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(
            f"hbk.read_idx: expected an unsigned-byte IDX file (magic 0x0000 08 nd), got "
            f"{data[:4].hex() or 'an empty file'} in {path}"
        )
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(data) - offset != count:
        raise ValueError(
            f"hbk.read_idx: expected {count} data bytes for shape {dims}, got "
            f"{len(data) - offset} in {path}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _mnist(root: Path, pool: str) -> tuple[np.ndarray, np.ndarray, str]:
    img_name, lbl_name = _MNIST_FILES[pool]
    img_path, lbl_path = _find_files(
        root, ("MNIST/raw", "mnist"), (img_name, lbl_name), f"MNIST {pool}", gz=True
    )
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"hbk.load_dataset: expected MNIST images (N, H, W) and labels (N,), got "
            f"{images.shape} and {labels.shape}"
        )
    return images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64), str(img_path)


def _cifar(root: Path, pool: str) -> tuple[np.ndarray, np.ndarray, str]:
    paths = _find_files(
        root, ("cifar-10-batches-py", "cifar10", "cifar-10"), _CIFAR_FILES[pool],
        f"CIFAR-10 {pool} (python batches)", gz=False,
    )
    xs, ys = [], []
    for p in paths:
        with open(p, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official CIFAR-10 python format
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] % 3 or len(data) != len(labels):
            raise ValueError(
                f"hbk.load_dataset: expected CIFAR data (N, 3*H*W) and labels (N,), got "
                f"{data.shape} and {labels.shape} in {p}"
            )
        side = int(round((data.shape[1] // 3) ** 0.5))
        # Each row is the R plane, then G, then B, each row-major H x W: channel-first as is.
        xs.append(data.reshape(len(data), 3, side, side))
        ys.append(labels)
    X = np.concatenate(xs).astype(np.float32) / 255.0
    return X, np.concatenate(ys), str(paths[0].parent)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:, None].astype(np.float32) / 16.0, d.target.astype(np.int64)


def _default_per_class(num_classes: int) -> int:
    return 300 if num_classes <= 3 else (200 if num_classes < 10 else 1000)


# ----------------------------------------------------------------------------------------------
# public entry points


def list_datasets(available_only: bool = False, root: str | None = None) -> list[str]:
    """Canonical dataset names.

    Besides these, ``"digits-<classes>"``, ``"mnist-<classes>"`` and ``"cifar-<classes>"`` accept
    any set of distinct class digits.

    Args:
        available_only: only the names that load now (MNIST / CIFAR only if their files are
            under ``root``).
        root: data directory for MNIST / CIFAR (default ``$HBK_DATA`` or ``./datasets``).

    Returns:
        Names in a fixed order: the 2-D and 1-D synthetic sets, Iris, digits and the reference
        subsets, then MNIST and CIFAR-10.
    """
    offline = list(_SYNTHETIC) + ["digits-017", "digits-179", "digits-0179", "digits-1379"]
    files = ["mnist-017", "mnist-179", "mnist-0179", "mnist-1379", "mnist", "cifar-127", "cifar"]
    if not available_only:
        return offline + files
    base = _data_root(root)
    names = list(offline)
    for n in files:
        family = n.split("-")[0]
        pool = "train" if "-" not in n else "test"
        try:
            if family == "mnist":
                _find_files(base, ("MNIST/raw", "mnist"), _MNIST_FILES[pool], "", gz=True)
            else:
                _find_files(
                    base, ("cifar-10-batches-py", "cifar10", "cifar-10"), _CIFAR_FILES[pool],
                    "", gz=False,
                )
        except FileNotFoundError:
            continue
        names.append(n)
    return names


_FAMILIES = ("digits", "mnist", "cifar")


def check_dataset_name(fn: str, name: Any) -> str:
    """``name`` must be a dataset :func:`load_dataset` knows (no file is read).

    Raises:
        TypeError: not a string.
        ValueError: unknown name; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"{fn}: expected a dataset name (str), got {type(name).__name__}")
    family, dash, spec = name.partition("-")
    if name in _GENERATORS or (family in _FAMILIES and not dash):
        return name
    if family in _FAMILIES:
        if not spec.isdigit() or len(set(spec)) != len(spec):
            raise ValueError(f"{fn}: expected distinct class digits after '-' (e.g. "
                             f"'{family}-017'), got {name!r}")
        return name
    shown = ", ".join(list(_SYNTHETIC) + [f"{f}-<classes>" for f in _FAMILIES] + ["mnist", "cifar"])
    raise ValueError(f"{fn}: expected a dataset name, one of {shown} (<classes>: distinct "
                     f"digits, e.g. digits-017), got {name!r}")


def _data_root(root: str | os.PathLike | None) -> Path:
    return Path(root if root is not None else os.environ.get("HBK_DATA", "datasets"))


def load_dataset(
    name: str,
    *,
    random_labels: bool = False,
    root: str | os.PathLike | None = None,
    split_seed: int = _SPLIT_SEED,
    dtype: torch.dtype = torch.float32,
    random_type: str = "uniform",
    per_class: int | None = None,
    pool: str | None = None,
) -> Dataset:
    """Load one of the paper's datasets with the reference split.

    Names (see :func:`list_datasets`): ``gauss`` (3 classes, 150/60/90), ``hierarchical``
    (4 classes), ``hierarchical-2`` (its 2-class variant), ``circle`` and ``half-moon``
    (100/40/60), ``checkerboard-linear`` / ``checkerboard-noisy`` (the "close" variants,
    200/80/120), ``intro`` (6 points, train = test = val), ``iris`` (120/30/0), ``digits``
    (sklearn's 1797 8x8 images as ``(N, 1, 8, 8)``, pixels / 16), ``digits-<classes>`` (the
    offline stand-in for the MNIST subsets: the first ``per_class`` images of each class,
    default the reference count 300 (<= 3 classes) / 200 (4-9) / 1000 (10) capped at the
    smallest class), ``mnist-<classes>`` / ``mnist`` (IDX files under ``root``, ``(N, 1, 28,
    28)``, pixels / 255) and ``cifar-<classes>`` / ``cifar`` (the python batches under
    ``root``, ``(N, 3, 32, 32)``, pixels / 255, 1000 per class). Class subsets are relabelled
    0..C-1 in the order of the name's digits. Image splits use 0.5/0.2 (MNIST, digits) and
    0.7/0.2 (CIFAR-10), as the reference configs.

    Args:
        name: dataset name.
        random_labels: permute the whole label vector before the split (numpy
            ``RandomState(28).permutation``, hierarchical 34; MNIST / CIFAR
            ``torch.randperm`` under a generator seeded 28). Class counts are unchanged.
        root: directory of the MNIST / CIFAR files (default ``$HBK_DATA`` or ``./datasets``;
            also searched: ``MNIST/raw``, ``mnist``, ``cifar-10-batches-py``).
        split_seed: seed of the split permutation (reference 42).
        dtype: floating dtype of the inputs.
        random_type: ``"uniform"`` (default) or ``"within"`` (hierarchical only: labels are
            permuted within {0, 1} and within {2, 3}).
        per_class: samples per class for ``digits-``, ``mnist`` and ``cifar`` subsets.
        pool: ``"train"`` or ``"test"`` file split for MNIST / CIFAR; default as the reference:
            the test split for class subsets, the train split for all 10 classes.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: unknown name or bad option.
        TypeError: non-floating dtype.
        FileNotFoundError: MNIST / CIFAR files missing (the message names them).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"hbk.load_dataset: expected a floating torch.dtype, got {dtype!r}")
    check_dataset_name("hbk.load_dataset", name)
    check_bool("hbk.load_dataset", "random_labels", random_labels)
    check_int("hbk.load_dataset", "split_seed", split_seed, 0)
    if random_type not in ("uniform", "within"):
        raise ValueError(
            f"hbk.load_dataset: expected random_type 'uniform' or 'within', got {random_type!r}"
        )
    if random_type == "within" and name != "hierarchical":
        raise ValueError(
            "hbk.load_dataset: expected random_type='within' only with 'hierarchical', got "
            f"{name!r}"
        )
    if pool not in (None, "train", "test"):
        raise ValueError(f"hbk.load_dataset: expected pool 'train' or 'test', got {pool!r}")
    if per_class is not None and (not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f"hbk.load_dataset: expected per_class >= 1, got {per_class!r}")

    family, _, spec = name.partition("-")
    extent = None
    torch_permutation = False
    if name in _GENERATORS:
        if per_class is not None or pool is not None:
            raise ValueError(
                f"hbk.load_dataset: expected per_class/pool only for image subsets, got {name!r}"
            )
        gen, source = _GENERATORS[name]
        X, y = gen()
        X = X.astype(np.float32)
        y = np.asarray(y, dtype=np.int64)
        if name == "hierarchical-2":
            y = y // 2
        train_f, test_f, extent = _SYNTHETIC[name]
        num_classes = int(y.max()) + 1
    elif family in ("digits", "mnist", "cifar"):
        classes = _parse_classes(name, spec) if spec else list(range(10))
        if family == "digits":
            if pool is not None:
                raise ValueError("hbk.load_dataset: expected no pool for digits (one set), got "
                                 f"{pool!r}")
            X_all, y_all = _digits()
            source = "sklearn load_digits, 8x8 pixels scaled to [0, 1] (divided by 16)"
            if spec:
                counts = np.bincount(y_all, minlength=10)[classes]
                n_per = per_class or min(_default_per_class(len(classes)), int(counts.min()))
                source += f", first {n_per} per class of {classes}"
            else:
                if per_class is not None:
                    raise ValueError("hbk.load_dataset: expected per_class only with a class "
                                     "subset such as 'digits-017', got 'digits'")
                n_per = None
            train_f, test_f = _IMAGE_FRACTIONS["digits"]
        else:
            use_pool = pool or ("train" if len(classes) == 10 else "test")
            loader = _mnist if family == "mnist" else _cifar
            X_all, y_all, where = loader(_data_root(root), use_pool)
            default = _default_per_class(len(classes)) if family == "mnist" else _CIFAR_PER_CLASS
            n_per = per_class or default
            train_f, test_f = _IMAGE_FRACTIONS[family]
            torch_permutation = True
            source = (f"{family.upper()} {use_pool} split from {where}, pixels scaled to [0, 1] "
                      f"(divided by 255), first {n_per} per class of {classes}")
        if n_per is not None:
            idx = _first_per_class(y_all, classes, n_per, "images")
            X, y_old = X_all[idx], y_all[idx]
            remap = np.full(10, -1, dtype=np.int64)
            remap[classes] = np.arange(len(classes))
            y = remap[y_old]
        else:
            X, y = X_all, y_all
        num_classes = len(classes)
        name = family if not spec else f"{family}-{spec}"
    else:
        raise ValueError(
            f"hbk.load_dataset: expected one of {', '.join(_SYNTHETIC)} or digits-/mnist-/cifar-"
            f"<classes>, got {name!r}"
        )

    if random_labels:
        if torch_permutation:
            perm = torch.randperm(
                len(y), generator=torch.Generator().manual_seed(_RANDOM_LABEL_SEED)
            )
            y = y[perm.numpy()]
        elif random_type == "within":
            y = _permute_within(y, ((0, 1), (2, 3)), _HIERARCHICAL_SEED)
        else:
            seed = _HIERARCHICAL_SEED if name.startswith("hierarchical") else _RANDOM_LABEL_SEED
            y = _permute_numpy(y, seed)

    X_t = torch.from_numpy(np.ascontiguousarray(X)).to(dtype)
    y_t = torch.from_numpy(np.ascontiguousarray(y)).to(torch.int64)
    tr, te, va = reference_split(len(y_t), train_f, test_f, split_seed)
    return Dataset(
        name=name,
        X_train=X_t[tr].contiguous(),
        y_train=y_t[tr].contiguous(),
        X_test=X_t[te].contiguous(),
        y_test=y_t[te].contiguous(),
        X_val=X_t[va].contiguous(),
        y_val=y_t[va].contiguous(),
        num_classes=num_classes,
        extent=extent,
        random_labels=bool(random_labels),
        random_type=random_type if random_labels else None,
        source=source,
    )
