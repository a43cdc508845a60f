"""The paper's architectures (``reference_setup.md`` section 2) with seeded initialisation.

Layer names follow the reference (``fc1``, ``fc2``, ``fc3`` for ``FNN_2layer``), so the
parameter order of ``model.parameters()`` is the reference order. Initialisation is PyTorch's
default (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and biases) drawn from the global
generator re-seeded with ``seed`` inside :func:`torch.random.fork_rng`, so the caller's random
state is untouched and the same seed gives the same model in every dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_seed

if TYPE_CHECKING:
    from .datasets import Dataset

__all__ = [
    "ARCHS",
    "CNN",
    "FNN",
    "MLP",
    "FNN2Layer",
    "LeNet5",
    "check_model_data",
    "default_model_for",
    "load_model",
    "make_model",
    "model_spec",
    "save_model",
]

ARCHS = ("fnn", "fnn2", "cnn", "lenet5")
_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"hbk.make_model: expected activation in {sorted(_ACTIVATIONS)}, got {activation!r}"
        )


class MLP(nn.Module):
    """Base of the fully connected nets: Linear layers with one activation between them.

    Inputs of any shape ``(n, *in_shape)`` are flattened to ``(n, in_features)``. The output is
    ``(n, C)`` logits, or log-probabilities when ``log_softmax`` is set (for the NLL loss).
    The batched trainer (:mod:`hbkernels.boundary.training`) relies on :meth:`linears`.
    """

    def __init__(self, sizes: list[int], activation: str, log_softmax: bool) -> None:
        super().__init__()
        _check_activation(activation)
        self.activation = activation
        self.log_softmax = bool(log_softmax)
        self.sizes = list(sizes)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            setattr(self, f"fc{i}", nn.Linear(a, b))

    def linears(self) -> list[nn.Linear]:
        """The Linear layers in forward order (``fc1``, ``fc2``, ...)."""
        return [getattr(self, f"fc{i}") for i in range(1, len(self.sizes))]

    def linear_chain(self):
        """This net as a :class:`hbkernels.hvp.LinearChain` (closed-form Hessian products), or
        None when its forward is not the plain chain (log_softmax, an overridden forward)."""
        from ..hvp import LinearChain

        if self.log_softmax or type(self).forward is not MLP.forward:
            return None
        layers = self.linears()
        return LinearChain(tuple(layers), (self.activation,) * (len(layers) - 1), flatten=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, *in_shape)`` -> ``(n, C)``."""
        layers = self.linears()
        x = x.reshape(x.shape[0], -1).to(layers[0].weight.dtype)
        act = _ACTIVATIONS[self.activation]
        for layer in layers[:-1]:
            x = act(layer(x))
        x = layers[-1](x)
        return F.log_softmax(x, dim=-1) if self.log_softmax else x


class FNN(MLP):
    """The reference ``FNN``: ``fc1`` Linear(in, h), activation, ``fc2`` Linear(h, C).

    Intro toy: in 1, h 10, C 2 gives 42 parameters.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int,
                 activation: str = "relu", log_softmax: bool = False) -> None:
        super().__init__([in_features, hidden, num_classes], activation, log_softmax)


class FNN2Layer(MLP):
    """The reference ``FNN_2layer``: fc1 Linear(in, h1), act, fc2 Linear(h1, h2), act, fc3.

    2-D input with 100/100 hidden units: C=2 gives 10,602 parameters, C=3 10,703, C=4 10,804;
    30/30 with C=3 1,113; Iris 4-50-50-3 2,953.
    """

    def __init__(self, in_features: int, hidden: tuple[int, int], num_classes: int,
                 activation: str = "relu", log_softmax: bool = False) -> None:
        super().__init__([in_features, hidden[0], hidden[1], num_classes], activation, log_softmax)


def _conv_out_features(body: Callable[[torch.Tensor], torch.Tensor],
                       in_shape: tuple[int, int, int]) -> int:
    """Flattened feature count of ``body`` for one input (0 when the image is too small)."""
    try:
        with torch.no_grad():
            return int(body(torch.zeros(1, *in_shape)).numel())
    except RuntimeError:  # a kernel larger than the (pooled) image
        return 0


def _conv_chain(model: nn.Module, cls: type, convs: list[nn.Conv2d], fcs: list[nn.Linear]):
    """``[conv ReLU MaxPool2d(2)]* Flatten [fc ReLU]* fc`` as a ConvChain (None when the
    model's forward is not that: log_softmax, or a subclass overriding forward/_features)."""
    from ..hvp import ConvChain

    if model.log_softmax or type(model).forward is not cls.forward or \
            type(model)._features is not cls._features:
        return None
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [conv, nn.ReLU(), nn.MaxPool2d(2)]
    layers.append(nn.Flatten())
    for fc in fcs[:-1]:
        layers += [fc, nn.ReLU()]
    return ConvChain((*layers, fcs[-1]))


class CNN(nn.Module):
    """The reference MNIST ``CNN``: Conv(c, 16, 3) ReLU MaxPool2, Conv(16, 32, 3) ReLU MaxPool2,
    flatten, Linear(., C).

    For 28x28 inputs (padding 0) the flatten size is 32x5x5 = 800 and C=3 gives 7,203
    parameters (C=10: 12,810). Images smaller than 14 pixels (the 8x8 digits) use padding 1,
    which keeps the same layers: 32x2x2 = 128 features, C=3 gives 5,187 parameters.
    The input is cast to the model's dtype in ``forward``, as the reference casts to float.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 log_softmax: bool = False, padding: int | None = None) -> None:
        super().__init__()
        c, h, w = in_shape
        self.padding = padding if padding is not None else (0 if min(h, w) >= 14 else 1)
        self.in_shape = tuple(in_shape)
        self.log_softmax = bool(log_softmax)
        self.conv1 = nn.Conv2d(c, 16, 3, 1, self.padding)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, self.padding)
        flat = _conv_out_features(self._features, self.in_shape)
        if flat == 0:
            raise ValueError(f"hbk.make_model: expected images large enough for the CNN, got "
                             f"{tuple(in_shape)}")
        self.fc = nn.Linear(flat, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def conv_chain(self):
        """This net as a :class:`hbkernels.hvp.ConvChain` (closed-form Hessian products), or
        None when its forward is not the plain chain (log_softmax, an overridden forward)."""
        return _conv_chain(self, CNN, [self.conv1, self.conv2], [self.fc])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, c, H, W)`` -> ``(n, C)``."""
        x = self.fc(self._features(x.to(self.fc.weight.dtype)))
        return F.log_softmax(x, dim=-1) if self.log_softmax else x


class LeNet5(nn.Module):
    """The reference ``LeNet5``: Conv(3, 6, 5) ReLU MaxPool2, Conv(6, 16, 5) ReLU MaxPool2,
    flatten 400, Linear 120 ReLU, Linear 84 ReLU, Linear C. C=10 gives 62,006 parameters.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 log_softmax: bool = False) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.log_softmax = bool(log_softmax)
        self.conv1 = nn.Conv2d(in_shape[0], 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        flat = _conv_out_features(self._features, self.in_shape)
        if flat == 0:
            raise ValueError(f"hbk.make_model: expected images large enough for LeNet-5, got "
                             f"{tuple(in_shape)}")
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def conv_chain(self):
        """This net as a :class:`hbkernels.hvp.ConvChain` (closed-form Hessian products), or
        None when its forward is not the plain chain (log_softmax, an overridden forward)."""
        return _conv_chain(self, LeNet5, [self.conv1, self.conv2], [self.fc1, self.fc2, self.fc3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` -> ``(n, C)``."""
        x = self._features(x.to(self.fc1.weight.dtype))
        x = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return F.log_softmax(x, dim=-1) if self.log_softmax else x


def _image_shape(in_features: int | tuple, default_hw: int) -> tuple[int, int, int]:
    if isinstance(in_features, int):
        return (in_features, default_hw, default_hw)
    shape = tuple(int(s) for s in in_features)
    if len(shape) != 3:
        raise ValueError(f"hbk.make_model: expected image shape (channels, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def make_model(
    arch: str,
    in_features: int | tuple,
    num_classes: int,
    *,
    width: int | tuple[int, int] = 100,
    activation: str = "relu",
    log_softmax: bool = False,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build a reference architecture.

    Args:
        arch: ``"fnn"`` (1 hidden layer of ``width``), ``"fnn2"`` (FNN_2layer, hidden
            ``width`` x ``width`` or a pair), ``"cnn"`` (MNIST CNN) or ``"lenet5"``.
        in_features: input size for fnn/fnn2 (an int, or an input shape that is flattened);
            image shape ``(c, H, W)`` for cnn/lenet5 (an int means c channels of 28x28 for cnn,
            32x32 for lenet5).
        num_classes: outputs C.
        width: hidden width(s) of fnn/fnn2 (ignored by the conv nets only if left at 100).
        activation: ``"relu"`` (reference default), ``"sigmoid"`` or ``"tanh"`` (fnn/fnn2).
        log_softmax: end with log_softmax (pair with the NLL loss).
        seed: seed of the default initialisation; None uses the global generator.
        dtype: floating parameter dtype.

    Returns:
        The module, with ``model.spec`` (the arguments, JSON-serialisable) for rebuilding.
    """
    check_bool("hbk.make_model", "log_softmax", log_softmax)
    check_seed("hbk.make_model", "seed", seed)
    if arch not in ARCHS:
        raise ValueError(f"hbk.make_model: expected arch in {ARCHS}, got {arch!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"hbk.make_model: expected a floating torch.dtype, got {dtype!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"hbk.make_model: expected num_classes >= 1, got {num_classes!r}")
    _check_activation(activation)
    if arch in ("cnn", "lenet5") and (activation != "relu" or width != 100):
        raise ValueError(f"hbk.make_model: expected no width/activation for {arch} (fixed "
                         f"architecture), got width={width!r}, activation={activation!r}")
    if arch in ("fnn", "fnn2"):
        d = in_features if isinstance(in_features, int) else int(torch.Size(in_features).numel())
        if d < 1:
            raise ValueError(f"hbk.make_model: expected in_features >= 1, got {in_features!r}")
        if arch == "fnn" and not isinstance(width, int):
            raise ValueError(f"hbk.make_model: expected an int width for fnn, got {width!r}")
        hidden = (width, width) if isinstance(width, int) else tuple(int(w) for w in width)
        if len(hidden) != 2 or min(hidden) < 1:
            raise ValueError(f"hbk.make_model: expected a positive width or pair, got {width!r}")

    def build() -> nn.Module:
        if arch == "fnn":
            return FNN(d, int(width), num_classes, activation, log_softmax)
        if arch == "fnn2":
            return FNN2Layer(d, hidden, num_classes, activation,  # type: ignore[arg-type]
                             log_softmax)
        if arch == "cnn":
            return CNN(_image_shape(in_features, 28), num_classes, log_softmax)
        return LeNet5(_image_shape(in_features, 32), num_classes, log_softmax)

    if seed is None:
        model = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
    model = model.to(dtype)
    model.spec = {  # type: ignore[assignment]
        "arch": arch,
        "in_features": in_features if isinstance(in_features, int) else list(in_features),
        "num_classes": num_classes,
        "width": width if isinstance(width, int) else list(width),
        "activation": activation,
        "log_softmax": bool(log_softmax),
        "seed": seed,
        "dtype": str(dtype).replace("torch.", ""),
    }
    return model


def _reference_arch(name: str) -> tuple[str, int | None]:
    family = name.split("-")[0]
    if family == "intro":
        return "fnn", 10
    if family == "iris":
        return "fnn2", 50
    if family in ("digits", "mnist"):
        return "cnn", None
    if family == "cifar":
        return "lenet5", None
    return "fnn2", 100


def default_model_for(
    dataset: Dataset,
    width: int | tuple[int, int] | None = None,
    *,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    activation: str = "relu",
    log_softmax: bool = False,
) -> nn.Module:
    """The reference architecture for a dataset.

    intro: fnn 1-10-2; 2-D data: fnn2 2-100-100-C; iris: fnn2 4-50-50-3; digits / MNIST: cnn;
    CIFAR-10: lenet5.

    Args:
        dataset: a :class:`~hbkernels.boundary.datasets.Dataset`.
        width: hidden width override for fnn/fnn2 (None: the reference width).
        seed: initialisation seed.
        dtype: parameter dtype (default: the dataset's).
        activation: for fnn/fnn2.
        log_softmax: end with log_softmax.

    Returns:
        The module.
    """
    arch, ref_width = _reference_arch(dataset.name)
    if ref_width is None and width is not None:
        raise ValueError(f"hbk.default_model_for: expected width=None for {dataset.name!r} "
                         f"({arch} has a fixed architecture), got {width!r}")
    shape = dataset.input_shape
    in_features: int | tuple = (shape if arch in ("cnn", "lenet5")
                                else int(torch.Size(shape).numel()))
    kwargs: dict[str, Any] = {"seed": seed, "dtype": dtype or dataset.dtype,
                              "log_softmax": log_softmax}
    if ref_width is not None:
        kwargs.update(width=width if width is not None else ref_width, activation=activation)
    return make_model(arch, in_features, dataset.num_classes, **kwargs)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The :func:`make_model` arguments of a model built by it (a copy)."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        raise ValueError("hbk.model_spec: expected a model built by make_model (with .spec), "
                         f"got {type(model).__name__}")
    return dict(spec)


def save_model(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Save ``{"spec", "state_dict", **extra}`` with torch.save (rebuild with :func:`load_model`).

    The spec's dtype is the parameters' current dtype.
    """
    from ..fileio import atomic_torch_save

    spec = model_spec(model)
    first = next(model.parameters(), None)
    if first is not None:
        spec["dtype"] = str(first.dtype).replace("torch.", "")
    atomic_torch_save({"spec": spec, "state_dict": model.state_dict(), **extra}, path)


def load_model(path: str | os.PathLike | dict) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or from such a dict).

    Args:
        path: file path, or the loaded dict.

    Returns:
        The module in its saved dtype, with the saved weights.
    """
    from ..fileio import CorruptFileError, load_torch

    fn = "hbk.load_model"
    where = "the given dict" if isinstance(path, dict) else str(path)
    blob = path if isinstance(path, dict) else load_torch(fn, path, what="a save_model file")
    if not isinstance(blob, dict) or "spec" not in blob or "state_dict" not in blob:
        got = type(blob).__name__ if not isinstance(blob, dict) else f"keys {sorted(blob)[:6]}"
        raise CorruptFileError(f"{fn}: expected a model file written by save_model (spec + "
                               f"state_dict), got {got} in {where}", where)
    try:
        spec = dict(blob["spec"])
        arch = spec.pop("arch")
        in_features = spec.pop("in_features")
        num_classes = spec.pop("num_classes")
        spec["dtype"] = getattr(torch, spec["dtype"])
        if isinstance(spec.get("width"), list):
            spec["width"] = tuple(spec["width"])
        if isinstance(in_features, list):
            in_features = tuple(in_features)
        model = make_model(arch, in_features, num_classes, **spec)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(f"{fn}: expected a spec and weights that match in {where}, got "
                               f"{type(err).__name__}: {first[:200]}", where) from None
    return model


def check_model_data(fn: str, model: nn.Module, dataset: Dataset) -> nn.Module:
    """Before any work: the model takes the dataset's inputs and has one output per class.

    Runs the model on two training inputs (cast to the model's dtype) and checks the output
    shape ``(2, num_classes)``, finite parameters and outputs, and labels in range.

    Raises:
        TypeError: not a module, no floating parameters, or mixed parameter dtypes.
        ValueError: the input width, number of classes or labels do not fit (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    if not params or not all(d.is_floating_point for d in dtypes) or len(dtypes) > 1:
        raise TypeError(f"{fn}: expected a model with parameters of one floating dtype, got "
                        f"{sorted(str(d) for d in dtypes) or 'no parameters'}")
    bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
    if bad:
        raise ValueError(f"{fn}: expected finite model parameters, got {bad} NaN/inf entries")
    name, C = dataset.name, dataset.num_classes
    X, y = dataset.X_train, dataset.y_train
    if len(y) == 0:
        raise ValueError(f"{fn}: expected a non-empty training set, got 0 samples of {name}")
    if y.dtype != torch.int64 or int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"{fn}: expected int64 labels in 0..{C - 1} for {name}, got "
                         f"{y.dtype} labels in {int(y.min())}..{int(y.max())}")
    shape = tuple(dataset.input_shape)
    try:
        with torch.no_grad():
            out = model(X[:2].to(next(iter(dtypes))))
    except Exception as err:  # noqa: BLE001 - any shape/dtype error of the forward pass
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        spec = getattr(model, "spec", None)
        takes = (f" (it was built for in_features={spec.get('in_features')})"
                 if isinstance(spec, dict) else "")
        raise ValueError(f"{fn}: expected a model that takes {name} inputs of shape {shape}"
                         f"{takes}, got {type(err).__name__}: {first[:200]}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != C:
        got = f"output shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else \
            type(out).__name__
        raise ValueError(f"{fn}: expected a model with {C} outputs for {name} ({C} classes), "
                         f"got {got}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{fn}: expected finite model outputs on {name}, got NaN/inf")
    return model
