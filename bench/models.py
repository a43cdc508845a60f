"""The benchmark models and their generated inputs (no downloads).

* ``mlp``: the paper's FNN_2layer 2-100-100-3 (p = 10,703) on the paper's 3-class Gaussian
  mixture (reference_setup.md 1.1), cross-entropy;
* ``cnn``: the paper's MNIST CNN (p = 7,203 for 3 classes) on 1x28x28 uniform images;
* ``lenet5``: LeNet-5 on CIFAR-shaped 3x32x32 inputs, 10 classes (p = 62,006); both describe
  themselves as a :class:`hbkernels.hvp.ConvChain`, so ``method="auto"`` runs the closed-form
  conv chain on them (``"double_backward"`` for the autograd products);
* ``resnet``: a small ResNet (3 basic blocks with BatchNorm, in eval mode) on 3x16x16 inputs;
* ``transformer``: a one-layer transformer encoder classifier on token sequences (attention
  run with the math SDPA backend, which has a double backward on every device);
* ``mlpreg``: an MLP regression 8-64-64-1 with MSE, data as a multi-batch DataLoader.

Every model is built in float32 with a fixed seed and briefly trained (a few SGD steps) so
the Hessian is not the one of a random initialisation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    """A model with its data: ``data`` is (X, y) or a list of batches for the DataLoader case."""

    name: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    persample_loss: str | None  # hbk per-sample loss name, None: not a classification model
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    description: str

    @property
    def p(self) -> int:
        return sum(q.numel() for q in self.model.parameters() if q.requires_grad)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def data(self) -> Any:
        """hbk's data argument: (X, y) for one batch, else the list of batches."""
        return (self.X, self.y) if len(self.batches) == 1 else self.batches

    def loader(self):
        """A DataLoader over the same batches (no shuffling)."""
        from torch.utils.data import DataLoader, TensorDataset

        bs = int(self.batches[0][0].shape[0])
        return DataLoader(TensorDataset(self.X, self.y), batch_size=bs, shuffle=False)


# ----------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """conv 3->w, blocks (w, w, s1), (w, 2w, s2), (2w, 2w, s1), global average pool, fc."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, one TransformerEncoderLayer, mean pool, fc."""

    def __init__(self, vocab: int = 32, seq: int = 12, d: int = 16, heads: int = 2,
                 ff: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        h = self.embed(tokens) + self.pos
        with sdpa_kernel(SDPBackend.MATH):
            h = self.layer(h)
        return self.fc(h.mean(1))


class RegMLP(nn.Module):
    def __init__(self, d: int = 8, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# ----------------------------------------------------------------------------- data
def gauss_mixture(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's 3-class mixture (RandomState(42), classes in blocks), n // 3 per class."""
    rs = np.random.RandomState(42)
    means = [(2, -1), (-2, 0), (0, 2)]
    stds = [(0.5, 0.5), (0.5, 1.0), (0.5, 0.5)]
    per = max(1, n // 3)
    X = np.concatenate([rs.normal(np.asarray(m, float), np.asarray(s, float), size=(per, 2))
                        for m, s in zip(means, stds)])
    return (torch.tensor(X, dtype=torch.float32),
            torch.from_numpy(np.repeat(np.arange(3), per)).long())


def _train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn, steps: int,
           lr: float = 0.02, batch: int = 64) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch, X.shape[0]),), generator=g)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()


# (n, size knob) per model: full and smoke.
SIZES = {
    "full": {"mlp": (999, 100), "cnn": (48, 3), "lenet5": (32, 10), "resnet": (32, 8),
             "transformer": (128, 16), "mlpreg": (256, 64)},
    "smoke": {"mlp": (60, 12), "cnn": (8, 3), "lenet5": (8, 10), "resnet": (4, 2),
              "transformer": (8, 8), "mlpreg": (32, 8)},
}
MODELS = list(SIZES["full"])


def device() -> str:
    """The benchmark device: ``HBK_BENCH_DEVICE`` (set by ``run.py --device``), default cpu."""
    return os.environ.get("HBK_BENCH_DEVICE", "cpu")


def make_case(name: str, scale: str = "full", n: int | None = None,
              width: int | None = None, steps: int | None = None) -> Case:
    """Build one benchmark case (model in eval mode, trained a few steps, data generated)."""
    n0, w0 = SIZES[scale][name]
    n = n or n0
    w = width or w0
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ce = F.cross_entropy
    train_steps = steps if steps is not None else (200 if scale == "full" else 20)
    if name == "mlp":
        from hbkernels.boundary.models import FNN2Layer

        X, y = gauss_mixture(n)
        model = FNN2Layer(2, (w, w), 3)
        desc = f"paper MLP 2-{w}-{w}-3, {X.shape[0]} Gaussian-mixture points"
    elif name == "cnn":
        from hbkernels.boundary.models import CNN

        X = torch.rand(n, 1, 28, 28, generator=gen)
        y = torch.randint(0, w, (n,), generator=gen)
        model = CNN((1, 28, 28), w)
        desc = f"paper MNIST CNN ({w} classes), {n} random 1x28x28 images"
    elif name == "lenet5":
        from hbkernels.boundary.models import LeNet5

        X = torch.rand(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, w, (n,), generator=gen)
        model = LeNet5((3, 32, 32), w)
        desc = f"LeNet-5, {n} random 3x32x32 images, {w} classes"
    elif name == "resnet":
        X = torch.rand(n, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        model = SmallResNet(w, 10)
        desc = f"ResNet (3 basic blocks, width {w}, BatchNorm in eval), {n} random 3x16x16"
    elif name == "transformer":
        seq = 12
        X = torch.randint(0, 32, (n, seq), generator=gen)
        y = (X[:, 0] % 4).long()
        model = TinyTransformer(32, seq, w, 2, 2 * w, 4)
        desc = f"transformer encoder (d={w}, 2 heads, 1 layer), {n} sequences of {seq} tokens"
    elif name == "mlpreg":
        X = torch.randn(n, 8, generator=gen)
        y = torch.sin(X[:, 0]) + 0.1 * X[:, 1:].sum(1)
        model = RegMLP(8, w)
        ce = F.mse_loss
        desc = f"MLP regression 8-{w}-{w}-1 (tanh, MSE), {n} points in 4 DataLoader batches"
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    model.train()
    if name == "resnet":  # BatchNorm running statistics from the data, then frozen
        with torch.no_grad():
            model(X)
    _train(model, X, y, ce, train_steps)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(True)
    dev = device()
    model, X, y = model.to(dev), X.to(dev), y.to(dev)
    nb = 4 if name == "mlpreg" else 1
    bs = n // nb
    batches = [(X[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(nb)]
    X, y = X[:nb * bs], y[:nb * bs]
    return Case(name, model, X, y, ce, None if name == "mlpreg" else "ce", batches, desc)


def flat_loss_fn(case: Case, dtype: torch.dtype = torch.float32):
    """``f(theta_flat) -> mean loss`` over all batches (functional_call), with theta0."""
    from torch.func import functional_call

    model = case.model if dtype == torch.float32 else _cast(case.model, dtype)
    named = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [v.shape for v in named.values()]
    sizes = [v.numel() for v in named.values()]
    batches = [(_cast_x(x, dtype), y.to(dtype) if y.is_floating_point() else y)
               for x, y in case.batches]
    buffers = dict(model.named_buffers())
    total = sum(int(x.shape[0]) for x, _ in batches)

    def f(theta: torch.Tensor) -> torch.Tensor:
        d = {k: t.view(s) for k, t, s in zip(named, torch.split(theta, sizes), shapes)}
        d.update(buffers)
        out = 0.0
        for x, y in batches:
            out = out + case.loss_fn(functional_call(model, d, (x,)), y) * (x.shape[0] / total)
        return out

    theta0 = torch.cat([v.reshape(-1) for v in named.values()])
    return f, theta0


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def _cast_x(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x
