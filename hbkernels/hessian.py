"""Hessians of a training loss: operator (HVPs), top-k eigenpairs, exact matrix, trace, density.

Every function works on the Hessian of the **mean** loss over the whole dataset,
``L(theta) = sum_b (n_b / N) loss_fn(model(X_b), y_b)``, with respect to the selected
parameters, in ``model.parameters()`` order (each tensor flattened row-major).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ._loader import load_extension
from .lanczos import LanczosResult, lanczos
from .results import Result as JsonResult
from .params import trainable_parameters

_C = load_extension()

__all__ = [
    "HessianOperator",
    "MatrixOperator",
    "SpectralDensity",
    "TraceResult",
    "exact_hessian",
    "hessian_eigs",
    "hessian_spectrum",
    "hessian_trace",
    "spectral_density",
]

_FLOATS = (torch.float32, torch.float64)
_METHODS = ("auto", "double_backward", "forward_over_reverse", "linear_chain")


# ------------------------------------------------------------------------------ operators
class MatrixOperator:
    """An explicit symmetric matrix as an operator (same interface as HessianOperator).

    Args:
        matrix: ``(dim, dim)`` float tensor (symmetry is the caller's responsibility).
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"hbk.MatrixOperator: expected a torch.Tensor, got {type(matrix).__name__}")
        if matrix.dtype not in _FLOATS:
            raise TypeError(f"hbk.MatrixOperator: expected float32 or float64, got {matrix.dtype}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"hbk.MatrixOperator: expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(dim,)`` or ``(dim, b)``, returned in v's dtype."""
        _check_vec("hbk.MatrixOperator", v, self.dim)
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[1]
        return (self.matrix @ v.to(self.device, self.dtype)).to(v.dtype)

    __matmul__ = matvec

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64) computing the same products."""
        return _to_scipy(self)


def _check_vec(fn: str, v: Any, dim: int) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{fn}: expected a floating-point vector, got {v.dtype}")
    if v.dim() not in (1, 2) or v.shape[0] != dim:
        raise ValueError(f"{fn}: expected shape ({dim},) or ({dim}, b), got {tuple(v.shape)}")


def _to_scipy(op):
    from scipy.sparse.linalg import LinearOperator

    def mv(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(op.device)
        return op.matvec(t.reshape(op.dim)).double().cpu().numpy()

    def mm(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(op.device)
        return op.matvec(t).double().cpu().numpy()

    return LinearOperator((op.dim, op.dim), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)


def _as_batches(fn: str, data: Any) -> list[tuple[Any, torch.Tensor]]:
    """``(X, y)`` or an iterable of ``(X, y)`` batches as a list of pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor) \
            and isinstance(data[0], torch.Tensor) and data[0].shape[:1] == data[1].shape[:1]:
        batches = [tuple(data)]
    else:
        try:
            batches = [tuple(b) for b in data]
        except TypeError:
            raise TypeError(
                f"{fn}: expected data to be (X, y) or an iterable of (X, y) batches, "
                f"got {type(data).__name__}"
            ) from None
    if not batches:
        raise ValueError(f"{fn}: expected at least one (X, y) batch, got none")
    for i, b in enumerate(batches):
        if len(b) != 2 or not all(isinstance(t, torch.Tensor) for t in b):
            raise TypeError(f"{fn}: expected batch {i} to be a pair of tensors (X, y), got {type(b).__name__}")
        if b[0].shape[0] != b[1].shape[0] or b[0].shape[0] == 0:
            raise ValueError(
                f"{fn}: expected X and y of batch {i} to have the same nonzero number of rows, "
                f"got {b[0].shape[0]} and {b[1].shape[0]}"
            )
    return batches


def _select_params(fn: str, model: nn.Module, params: Any) -> list[str]:
    """Names (in model.parameters() order) of the parameters selected by ``params``."""
    trainable = {id(p) for p in trainable_parameters(model)}  # the one parameter order
    named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
    if params is None:
        names = [n for n, _ in named]
    elif callable(params) and not isinstance(params, nn.Parameter):
        names = [n for n, _ in named if params(n)]
    else:
        try:
            wanted = {id(p) for p in params}
        except TypeError:
            raise TypeError(
                f"{fn}: expected params to be None, a name predicate or an iterable of parameters, "
                f"got {type(params).__name__}"
            ) from None
        names = [n for n, p in named if id(p) in wanted]
        if len(names) != len(wanted):
            raise ValueError(
                f"{fn}: expected params to be trainable parameters of model, got "
                f"{len(wanted) - len(names)} tensor(s) that are not"
            )
    if not names:
        raise ValueError(f"{fn}: expected params to select at least one trainable parameter, got none")
    return names


# ------------------------------------------------------------------------------ linear chains
_CHAIN_ACTS = ("relu", "tanh", "sigmoid")


def _activation_name(module: nn.Module) -> str | None:
    for cls, name in ((nn.ReLU, "relu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid")):
        if type(module) is cls:
            return name
    return None


def _linear_chain(model: nn.Module) -> tuple[list[nn.Linear], list[str]] | None:
    """``(linears, activations)`` if ``model`` computes ``Linear (act Linear)*`` on flattened
    inputs and has no other parameters, else None.

    Recognised: an ``nn.Sequential`` of ``[Flatten,] Linear, act, Linear, ..., Linear`` with act
    in ReLU/Tanh/Sigmoid, and the fully connected nets of :mod:`hbkernels.boundary.models`
    (``MLP`` subclasses with their own forward, without ``log_softmax``).
    """
    layers: list[nn.Linear] = []
    acts: list[str] = []
    if type(model) is nn.Sequential:
        mods = list(model)
        if mods and type(mods[0]) is nn.Flatten and mods[0].start_dim == 1 and mods[0].end_dim == -1:
            mods = mods[1:]
        if not mods or len(mods) % 2 == 0:
            return None
        for i, m in enumerate(mods):
            if i % 2 == 0:
                if type(m) is not nn.Linear:
                    return None
                layers.append(m)
            else:
                name = _activation_name(m)
                if name is None:
                    return None
                acts.append(name)
    else:
        try:
            from .boundary.models import MLP
        except ImportError:  # pragma: no cover - the boundary package is optional here
            return None
        if not isinstance(model, MLP) or type(model).forward is not MLP.forward:
            return None
        if model.log_softmax or model.activation not in _CHAIN_ACTS:
            return None
        layers = list(model.linears())
        acts = [model.activation] * (len(layers) - 1)
    chain_params = {id(p) for lin in layers for p in lin.parameters()}
    if chain_params != {id(p) for p in model.parameters()} or list(model.buffers()):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    return layers, acts


def _is_plain_cross_entropy(loss_fn) -> bool:
    """``F.cross_entropy`` or a default ``nn.CrossEntropyLoss`` (mean, no weights, no smoothing)."""
    if loss_fn is F.cross_entropy:
        return True
    return (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean"
            and loss_fn.weight is None and loss_fn.label_smoothing == 0.0)


def _act_derivatives(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma(z), sigma'(z), sigma''(z)) elementwise."""
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype), torch.zeros((), dtype=z.dtype, device=z.device)
    if name == "tanh":
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


class _ChainHVP:
    """Closed-form Hessian-vector products for Linear/activation chains (Pearlmutter's R-op).

    For ``z_l = a_l W_l^T + b_l``, ``a_{l+1} = sigma(z_l)``, output ``z_{L-1}``, the forward
    tangents ``Rz_l = Ra_l W_l^T + a_l dW_l^T + db_l``, ``Ra_{l+1} = sigma'(z_l) Rz_l``, then the
    loss Hessian in output space (autograd on the small ``(n, C)`` loss graph), then
    ``RgW_l = Rdelta_l^T a_l + delta_l^T Ra_l``, ``Re_l = Rdelta_{l+1} W_{l+1} + delta_{l+1}
    dW_{l+1}``, ``Rdelta_l = sigma'(z_l) Re_l + sigma''(z_l) e_l Rz_l``. The forward and
    backward quantities of every batch are computed once; a block of ``b`` directions costs
    a few large GEMMs per layer (about 6 ``n d_in d_out`` multiply-adds per direction for the
    hidden layers, 2 for an identity column in :meth:`unit_columns`).
    """

    def __init__(self, layers, acts, batches, weights, loss_fn, dtype) -> None:
        self.W = [lin.weight.detach().to(dtype) for lin in layers]
        self.b = [None if lin.bias is None else lin.bias.detach().to(dtype) for lin in layers]
        self.acts = acts
        self.L = len(layers)
        self.loss_fn = loss_fn
        self.cache = [self._prepare(x, y, w) for (x, y), w in zip(batches, weights)]

    def _prepare(self, x: torch.Tensor, y: torch.Tensor, w: float) -> dict:
        a = [x.reshape(x.shape[0], -1).to(self.W[0].dtype)]
        s1, s2 = [], []
        with torch.no_grad():
            for l in range(self.L):
                z = a[l] @ self.W[l].T
                if self.b[l] is not None:
                    z = z + self.b[l]
                if l < self.L - 1:
                    act, d1, d2 = _act_derivatives(self.acts[l], z)
                    a.append(act)
                    s1.append(d1)
                    s2.append(d2)
            out = z

        def lfun(o: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(o, y) * w

        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            gout = torch.autograd.grad(lfun(o), o)[0]
        c_extra = {}
        if _is_plain_cross_entropy(self.loss_fn) and y.dtype == torch.long and y.dim() == 1 \
                and bool((y >= 0).all()):
            # mean cross-entropy: the output Hessian of sample i is (diag(p_i) - p_i p_i^T) w / n
            c_extra = {"ce_p": torch.softmax(out, dim=1), "ce_scale": w / out.shape[0]}
        delta = [None] * self.L
        e = [None] * (self.L - 1)
        delta[-1] = gout
        for l in range(self.L - 1, 0, -1):
            e[l - 1] = delta[l] @ self.W[l]
            delta[l - 1] = s1[l - 1] * e[l - 1]
        return {"a": a, "s1": s1, "s2": s2, "delta": delta, "e": e, "out": out, "lfun": lfun,
                **c_extra}

    @staticmethod
    def _hout(c: dict, rout: torch.Tensor) -> torch.Tensor:
        """Loss Hessian in output space applied to ``rout`` (n, b, C) -> (n, b, C): a
        double backward through the small ``(n, C)`` loss graph (kept per batch), or the
        closed form of the mean cross-entropy."""
        if "ce_p" in c:
            p = c["ce_p"][:, None, :]
            return (p * rout - p * (rout * p).sum(-1, keepdim=True)) * c["ce_scale"]
        if "gout_graph" not in c:
            o = c["out"].detach().requires_grad_(True)
            with torch.enable_grad():
                g = torch.autograd.grad(c["lfun"](o), o, create_graph=True)[0]
            c["gout_graph"] = (o, g)
        o, g = c["gout_graph"]
        if not g.requires_grad:  # a loss linear in the outputs
            return torch.zeros_like(rout)
        b = rout.shape[1]
        with torch.enable_grad():
            if b == 1:
                h = torch.autograd.grad(g, o, grad_outputs=rout[:, 0], retain_graph=True)[0][:, None]
            else:
                h = torch.autograd.grad(g, o, grad_outputs=rout.transpose(0, 1), retain_graph=True,
                                        is_grads_batched=True)[0].transpose(0, 1)
        return h

    def _one_batch(self, c: dict, dW: list, db: list, unit: tuple | None,
                   lower: bool = False) -> tuple[list, list]:
        """One batch's (H V) per layer. Tangents are kept as (n, b, d) so that every product
        with a weight or an activation matrix is one GEMM without copies. ``unit`` =
        (layer, "W" | "b", flat indices): identity directions, whose first tangent is one
        column per direction ("sparse": values (n, b) and the column of each direction).
        ``lower`` (with ``unit``): only the rows from the first direction's index on are
        needed (the rest follows by symmetry): the backward pass stops at the unit's layer
        and computes its weight rows from the first direction's row on."""
        a, s1, s2, delta, e = c["a"], c["s1"], c["s2"], c["delta"], c["e"]
        L, n = self.L, a[0].shape[0]
        dev, dt = a[0].device, a[0].dtype
        smooth = [act != "relu" for act in self.acts]
        if unit is not None:
            l0, kind, idx = unit
            bsz = idx.numel()
            ar = torch.arange(bsz, device=dev)
            if kind == "W":
                urows, ucols = idx // self.W[l0].shape[1], idx % self.W[l0].shape[1]
            else:
                urows, ucols = idx, None
        else:
            l0 = -1
            bsz = next(t.shape[0] for t in dW + db if t is not None)
        Ra: list = [None] * L   # dense (n, b, in_l) or ("sparse", vals (n, b), cols (b,))
        Rz: list = [None] * L   # kept only where a smooth activation needs it
        for l in range(L):
            out_l, in_l = self.W[l].shape
            if l == l0:  # sparse first tangent: column urows[k] of direction k
                vals = a[l][:, ucols] if kind == "W" else torch.ones(n, bsz, dtype=dt, device=dev)
                if l == L - 1:
                    rz = torch.zeros(n, bsz, out_l, dtype=dt, device=dev)
                    rz[:, ar, urows] = vals
                else:
                    if smooth[l]:
                        Rz[l] = ("sparse", vals, urows)
                    Ra[l + 1] = ("sparse", vals * s1[l][:, urows], urows)
                    continue
            else:
                rz = None
                ra = Ra[l]
                if isinstance(ra, tuple):  # sparse: Rz[:, k] = vals[:, k] * W[:, col_k]
                    rz = ra[1][:, :, None] * self.W[l][:, ra[2]].T[None]
                elif ra is not None:
                    rz = (ra.reshape(n * bsz, in_l) @ self.W[l].T).view(n, bsz, out_l)
                if dW[l] is not None:  # a_l dW^T for all directions: one GEMM
                    t = (a[l] @ dW[l].permute(2, 0, 1).reshape(in_l, bsz * out_l)).view(n, bsz, out_l)
                    rz = t if rz is None else rz.add_(t)
                if db[l] is not None:
                    rz = db[l][None].expand(n, bsz, out_l).clone() if rz is None else rz.add_(db[l][None])
                if rz is None:
                    continue
            if l == L - 1:
                Rz[l] = rz
            else:
                if smooth[l]:
                    Rz[l] = rz
                    Ra[l + 1] = rz * s1[l][:, None, :]
                else:
                    Ra[l + 1] = rz.mul_(s1[l][:, None, :])
        Rd = None if Rz[L - 1] is None else self._hout(c, Rz[L - 1])
        gW: list = [None] * L
        gb: list = [None] * L
        for l in range(L - 1, -1, -1):
            out_l, in_l = self.W[l].shape
            g = None
            if lower and l == l0 and Rd is not None:
                gb[l] = Rd.sum(0)
                if kind == "b":
                    break
                o_min = int(urows.min())  # rows before it are not needed (symmetry)
                part = Rd[:, :, o_min:].reshape(n, bsz * (out_l - o_min))
                g = torch.zeros(bsz, out_l, in_l, dtype=dt, device=dev)
                g[:, o_min:, :] = (a[l].T @ part).view(in_l, bsz, out_l - o_min).permute(1, 2, 0)
                gW[l] = g
                break
            if Rd is not None:  # Rdelta^T a_l
                g = (a[l].T @ Rd.reshape(n, bsz * out_l)).view(in_l, bsz, out_l).permute(1, 2, 0)
                gb[l] = Rd.sum(0)
            ra = Ra[l]
            if isinstance(ra, tuple):  # delta_l^T Ra_l: one column per direction
                m = delta[l].T @ ra[1]  # (out, b)
                g = torch.zeros(bsz, out_l, in_l, dtype=dt, device=dev) if g is None else g.contiguous()
                g[torch.arange(bsz, device=dev), :, ra[2]] += m.T
            elif ra is not None:
                t = (delta[l].T @ ra.reshape(n, bsz * in_l)).view(out_l, bsz, in_l).transpose(0, 1)
                g = t if g is None else g + t
            gW[l] = g
            if l == 0:
                break
            re = None
            if Rd is not None:
                re = (Rd.reshape(n * bsz, out_l) @ self.W[l]).view(n, bsz, in_l)
            if dW[l] is not None:  # delta_l dW_l
                t = (delta[l] @ dW[l].transpose(0, 1).reshape(out_l, bsz * in_l)).view(n, bsz, in_l)
                re = t if re is None else re.add_(t)
            if l == l0 and kind == "W":  # delta_l dW_l for identity directions
                if re is None:
                    re = torch.zeros(n, bsz, in_l, dtype=dt, device=dev)
                re[:, ar, ucols] += delta[l][:, urows]
            rd = None if re is None else re.mul_(s1[l - 1][:, None, :])
            rz = Rz[l - 1]
            if rz is not None:  # sigma'' e Rz (smooth activations only)
                se = s2[l - 1] * e[l - 1]
                if isinstance(rz, tuple):
                    if rd is None:
                        rd = torch.zeros(n, bsz, in_l, dtype=dt, device=dev)
                    rd[:, torch.arange(bsz, device=dev), rz[2]] += se[:, rz[2]] * rz[1]
                else:
                    t = se[:, None, :] * rz
                    rd = t if rd is None else rd.add_(t)
            Rd = rd
        return gW, gb

    def products(self, dW: list, db: list, unit: tuple | None = None,
                 lower: bool = False) -> tuple[list, list]:
        """Summed over batches: per layer (H V)_W (b, out, in) and (H V)_b (b, out) (or None)."""
        tot_W: list = [None] * self.L
        tot_b: list = [None] * self.L
        for c in self.cache:
            gW, gb = self._one_batch(c, dW, db, unit, lower)
            for l in range(self.L):
                if gW[l] is not None:
                    tot_W[l] = gW[l] if tot_W[l] is None else tot_W[l] + gW[l]
                if gb[l] is not None:
                    tot_b[l] = gb[l] if tot_b[l] is None else tot_b[l] + gb[l]
        return tot_W, tot_b


class HessianOperator:
    """The Hessian of the mean training loss as a linear operator: ``H @ v`` and ``H @ V``.

    Args:
        model: the network; it is not modified (parameters are passed functionally).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss, e.g.
            ``torch.nn.functional.cross_entropy``.
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches (materialised once). The
            Hessian is of the mean loss over all samples (batches weighted by size).
        params: which parameters: None (all trainable), an iterable of the model's parameters,
            or a predicate on parameter names (e.g. ``lambda n: n.startswith("fc1")``).
        method: "double_backward" (reverse-over-reverse; with one batch the first-order graph
            is built once and reused by every product), "forward_over_reverse"
            (``jvp(grad)``, vmapped over blocks), "linear_chain" (closed-form R-op for
            ``Linear (act Linear)*`` models with ReLU/Tanh/Sigmoid: forward and backward
            quantities cached per batch, a block of vectors as a few large GEMMs per layer;
            see :func:`_linear_chain` for the recognised models), or "auto": "linear_chain"
            when the model is such a chain (rule: it never traverses an autograd graph and
            is the fastest here, see bench/bench_lanczos.py), otherwise the faster of the two
            autograd methods, timed on the first product of each kind (single vector /
            block) and then kept.
        dtype: dtype of the Hessian (float32/float64). When it differs from the model's, the
            products are computed on a copy of the model (and of the floating inputs) cast to
            it. Default: the model's parameter dtype.

    Attributes:
        dim: number of selected parameters ``p``.
        num_matvecs: Hessian-vector products computed so far (a block of ``b`` counts ``b``,
            including the trial products of ``method="auto"``).
        methods_used: the method chosen for single vectors and for blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data: Any,
        params: Any = None,
        method: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> None:
        fn = "hbk.HessianOperator"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"{fn}: expected loss_fn to be callable, got {type(loss_fn).__name__}")
        if method not in _METHODS:
            raise ValueError(f"{fn}: expected method to be one of {_METHODS}, got {method!r}")
        names = _select_params(fn, model, params)
        pdict = dict(model.named_parameters())
        model_dtype = pdict[names[0]].dtype
        if dtype is None:
            dtype = model_dtype
        if dtype not in _FLOATS:
            raise TypeError(f"{fn}: expected dtype float32 or float64, got {dtype}")
        batches = _as_batches(fn, data)
        if dtype != model_dtype:
            model = copy.deepcopy(model).to(dtype)
            pdict = dict(model.named_parameters())
        self.model = model
        self.loss_fn = loss_fn
        self.names = names
        self.dtype = dtype
        self.device = pdict[names[0]].device
        self.shapes = [pdict[n].shape for n in names]
        self.numels = [pdict[n].numel() for n in names]
        self.dim = sum(self.numels)
        self._params = {n: pdict[n].detach() for n in names}
        # Everything else (frozen parameters, buffers) enters as constants; buffers are copied
        # so that train-mode BatchNorm does not change the model's running statistics.
        self._frozen = {n: p.detach() for n, p in model.named_parameters() if n not in self._params}
        self._frozen.update({n: b.detach().clone() for n, b in model.named_buffers()})
        self.batches = [
            (x.to(self.device, dtype) if x.is_floating_point() else x.to(self.device), y.to(self.device))
            for x, y in batches
        ]
        self.num_samples = sum(int(x.shape[0]) for x, _ in self.batches)
        self.weights = [x.shape[0] / self.num_samples for x, _ in self.batches]
        self.method = method
        self.methods_used: dict[str, str] = {}
        self._chain_spec = _linear_chain(model)
        if self._chain_spec is not None:
            d_in = self._chain_spec[0][0].in_features
            flat_ok = all(x.is_floating_point() and x[0].numel() == d_in and
                          (x.dim() == 2 or type(model) is not nn.Sequential or
                           type(model[0]) is nn.Flatten) for x, _ in self.batches)
            if not flat_ok:
                self._chain_spec = None
        if method == "linear_chain" and self._chain_spec is None:
            raise ValueError(
                f"{fn}: expected a Linear/activation chain for method='linear_chain' (an nn.Sequential "
                "of [Flatten,] Linear, ReLU|Tanh|Sigmoid, ..., Linear, or a boundary MLP), got "
                f"{type(model).__name__}"
            )
        if method == "auto" and self._chain_spec is not None:
            method_fixed = "linear_chain"
        else:
            method_fixed = None if method == "auto" else method
        if method_fixed is not None:
            self.methods_used = {"single": method_fixed, "block": method_fixed}
        self._chain = None  # _ChainHVP, built on first use
        self.num_matvecs = 0
        self._graph = None  # (params list, grads) of the single batch, built on first use

    # ---------------------------------------------------------------- public interface
    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v``.

        Args:
            v: ``(p,)`` or ``(p, b)`` (a block of b vectors), any float dtype.

        Returns:
            Same shape and dtype as ``v`` (computed in the operator's dtype).
        """
        _check_vec("hbk.HessianOperator", v, self.dim)
        single = v.dim() == 1
        rows = (v[None, :] if single else v.t()).to(self.device, self.dtype)  # (b, p)
        b = rows.shape[0]
        kind = "single" if b == 1 else "block"
        if kind not in self.methods_used:
            out = self._choose(kind, rows)
        else:
            out = self._products(self.methods_used[kind], rows)
        self.num_matvecs += b
        out = out.to(v.dtype)
        return out[0] if single else out.t()

    __matmul__ = matvec

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 in and out) with the same products."""
        return _to_scipy(self)

    def loss(self) -> float:
        """The mean loss over the dataset at the current parameters."""
        with torch.no_grad():
            total = 0.0
            for (x, y), w in zip(self.batches, self.weights):
                total += w * float(self._loss(self._params, x, y))
        return total

    def release(self) -> None:
        """Free the stored first-order graph (rebuilt on the next product if needed)."""
        self._graph = None

    # ---------------------------------------------------------------- internals
    def _loss(self, pdict: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self._frozen, **pdict}, (x,))
        return self.loss_fn(out, y)

    def _split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """(b, p) rows as {name: (b, *shape)} views."""
        b = rows.shape[0]
        parts = torch.split(rows, self.numels, dim=1)
        return {n: t.reshape(b, *s) for n, t, s in zip(self.names, parts, self.shapes)}

    def _join(self, parts: list[torch.Tensor], b: int) -> torch.Tensor:
        return torch.cat([t.reshape(b, -1) for t in parts], dim=1)

    def _choose(self, kind: str, rows: torch.Tensor) -> torch.Tensor:
        """method="auto": time both methods on this product, keep the faster."""
        times, outs = {}, {}
        if len(self.batches) == 1:
            self._first_order_graph()  # graph building is a one-off, not part of the timing
        for m in ("double_backward", "forward_over_reverse"):
            try:
                t0 = time.perf_counter()
                outs[m] = self._products(m, rows)
                times[m] = time.perf_counter() - t0
            except (RuntimeError, NotImplementedError):
                # e.g. an op without a forward-mode or batching rule
                continue
        if not times:
            return self._products("double_backward", rows)  # re-raises the error
        best = min(times, key=times.get)
        self.methods_used[kind] = best
        self.num_matvecs += rows.shape[0] * (len(times) - 1)
        return outs[best]

    def _chain_engine(self) -> _ChainHVP:
        if self._chain is None:
            layers, acts = self._chain_spec
            self._chain = _ChainHVP(layers, acts, self.batches, self.weights, self.loss_fn, self.dtype)
            where = {}
            for l, lin in enumerate(layers):
                where[id(lin.weight)] = (l, "W")
                if lin.bias is not None:
                    where[id(lin.bias)] = (l, "b")
            named = dict(self.model.named_parameters())
            self._chain_where = [where[id(named[n])] for n in self.names]
        return self._chain

    def _chain_products(self, parts: list | None, b: int, unit: tuple | None = None,
                        lower: bool = False) -> torch.Tensor:
        eng = self._chain_engine()
        dW: list = [None] * eng.L
        db: list = [None] * eng.L
        if parts is not None:
            for (l, kind), t in zip(self._chain_where, parts):
                (dW if kind == "W" else db)[l] = t
        gW, gb = eng.products(dW, db, unit, lower)
        out = []
        for (l, kind), shape in zip(self._chain_where, self.shapes):
            t = gW[l] if kind == "W" else gb[l]
            out.append(torch.zeros(b, *shape, dtype=self.dtype, device=self.device) if t is None else t)
        return self._join(out, b)

    def columns(self, j0: int, j1: int, lower: bool = False) -> torch.Tensor:
        """``H[:, j0:j1]`` as a ``(p, j1 - j0)`` tensor (products with identity columns).

        Args:
            j0, j1: column range, ``0 <= j0 < j1 <= p``.
            lower: only the entries on and below the diagonal (rows ``i >= j`` of column
                ``j``) are needed; the caller fills the rest by symmetry. With the
                "linear_chain" method this skips the backward pass below each column's layer
                and the entries above the diagonal are then unspecified. Other methods ignore
                it.

        Returns:
            ``(p, j1 - j0)``. Counted in ``num_matvecs``.
        """
        if not (0 <= j0 < j1 <= self.dim):
            raise ValueError(f"hbk.HessianOperator.columns: expected 0 <= j0 < j1 <= {self.dim}, got {j0}, {j1}")
        if self.methods_used.get("block") == "linear_chain":
            self.num_matvecs += j1 - j0
            self._chain_engine()
            blocks, off = [], 0
            for i, numel in enumerate(self.numels):
                lo, hi = max(j0, off), min(j1, off + numel)
                if lo < hi:
                    l, kind = self._chain_where[i]
                    idx = torch.arange(lo - off, hi - off, device=self.device)
                    blocks.append(self._chain_products(None, hi - lo, (l, kind, idx), lower))
                off += numel
            return torch.cat(blocks).t()
        E = torch.zeros(j1 - j0, self.dim, dtype=self.dtype, device=self.device)
        E[torch.arange(j1 - j0), torch.arange(j0, j1)] = 1
        return self.matvec(E.t())

    @property
    def exploits_symmetry(self) -> bool:
        """Whether :meth:`columns` with ``lower=True`` saves work (the "linear_chain" method)."""
        return self.methods_used.get("block") == "linear_chain"

    def _products(self, method: str, rows: torch.Tensor) -> torch.Tensor:
        if method == "linear_chain":
            b = rows.shape[0]
            return self._chain_products(list(self._split(rows).values()), b)
        if method == "double_backward":
            if len(self.batches) == 1:
                params, grads = self._first_order_graph()
                return self._reverse_over_reverse(params, grads, rows)
            total = None
            for (x, y), w in zip(self.batches, self.weights):
                params, grads = self._build_graph(x, y)
                out = self._reverse_over_reverse(params, grads, rows, retain=False).mul_(w)
                total = out if total is None else total.add_(out)
            return total
        total = None
        for (x, y), w in zip(self.batches, self.weights):
            out = self._forward_over_reverse(x, y, rows).mul_(w)
            total = out if total is None else total.add_(out)
        return total

    def _build_graph(self, x: torch.Tensor, y: torch.Tensor):
        params = {n: p.detach().requires_grad_(True) for n, p in self._params.items()}
        with torch.enable_grad():
            loss = self._loss(params, x, y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return list(params.values()), grads

    def _first_order_graph(self):
        if self._graph is None:
            x, y = self.batches[0]
            self._graph = self._build_graph(x, y)
        return self._graph

    def _reverse_over_reverse(self, params, grads, rows: torch.Tensor, retain: bool = True):
        b = rows.shape[0]
        vs = list(self._split(rows).values())
        # Gradients that do not depend on the parameters (constant) contribute nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return torch.zeros_like(rows)
        outs = [grads[i] for i in live]
        with torch.enable_grad():
            if b == 1:
                res = torch.autograd.grad(outs, params, grad_outputs=[vs[i][0] for i in live],
                                          retain_graph=retain, allow_unused=True)
            else:
                res = torch.autograd.grad(outs, params, grad_outputs=[vs[i] for i in live],
                                          retain_graph=retain, allow_unused=True,
                                          is_grads_batched=True)
        shape_b = (b,) if b > 1 else ()
        res = [torch.zeros(*shape_b, *p.shape, dtype=p.dtype, device=p.device) if r is None else r
               for r, p in zip(res, params)]
        return self._join(res, b)

    def _forward_over_reverse(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor):
        b = rows.shape[0]
        tangents = self._split(rows)
        g = grad(lambda p: self._loss(p, x, y))

        def hvp(t: dict) -> dict:
            return jvp(g, (self._params,), (t,))[1]

        if b == 1:
            out = hvp({n: t[0] for n, t in tangents.items()})
            return self._join([out[n] for n in self.names], 1)
        out = vmap(hvp)(tangents)
        return self._join([out[n] for n in self.names], b)


def _as_operator(fn: str, op: Any):
    if isinstance(op, torch.Tensor):
        return MatrixOperator(op)
    if not hasattr(op, "dim") or not hasattr(op, "matvec"):
        raise TypeError(
            f"{fn}: expected an operator with .dim and .matvec (HessianOperator, MatrixOperator) "
            f"or a square tensor, got {type(op).__name__}"
        )
    return op


# ------------------------------------------------------------------------------ eigenpairs
def hessian_eigs(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    k: int,
    which: str = "LA",
    tol: float = 1e-6,
    params: Any = None,
    method: str = "auto",
    hvp_dtype: torch.dtype | None = None,
    **lanczos_kwargs: Any,
) -> LanczosResult:
    """Top-k (or bottom-k) eigenpairs of the loss Hessian by :func:`hbkernels.lanczos`.

    Args:
        model, loss_fn, data, params, method: as for :class:`HessianOperator`.
        k: number of eigenpairs.
        which: "LA", "SA" or "LM".
        tol: relative residual tolerance.
        hvp_dtype: dtype of the Hessian-vector products (HessianOperator's ``dtype``).
        **lanczos_kwargs: forwarded to :func:`hbkernels.lanczos` (ncv, max_matvecs, v0, seed,
            dtype of the basis (default float64), block_size, quiet, ...).

    Returns:
        :class:`LanczosResult`; eigenvectors ``(p, k)`` as columns in ``model.parameters()``
        order (restricted to ``params``). ``extra`` records the HVP method and the dataset size.
    """
    op = HessianOperator(model, loss_fn, data, params=params, method=method, dtype=hvp_dtype)
    lanczos_kwargs.setdefault("device", op.device)
    res = lanczos(op.matvec, op.dim, k, which=which, tol=tol, **lanczos_kwargs)
    res.extra = {
        "hvp_methods": dict(op.methods_used),
        "hvp_dtype": str(op.dtype),
        "num_samples": op.num_samples,
        "dim": op.dim,
    }
    return res


# ------------------------------------------------------------------------------ exact Hessian
def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _activation_numel(op: HessianOperator) -> int:
    """Elements of all module outputs in one forward over the largest batch."""
    x, _ = max(op.batches, key=lambda b: b[0].shape[0])
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in op.model.modules()]
    try:
        with torch.no_grad():
            functional_call(op.model, {**op._frozen, **op._params}, (x,))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def exact_hessian(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    quiet: bool = True,
    params: Any = None,
    method: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The exact ``(p, p)`` Hessian, assembled from block HVPs on identity column chunks.

    Column chunk ``[c0, c1)`` is ``H @ I[:, c0:c1]`` (one block product), never one backward
    pass per parameter. With the "linear_chain" method only the lower triangle is computed
    (the backward pass stops at each chunk's layer) and mirrored; otherwise the result is
    symmetrised, ``(H + H^T) / 2``, tile by tile.

    Args:
        model, loss_fn, data, params, method: as for :class:`HessianOperator`.
        dtype: float32 or float64 (default: the model's dtype).
        memory_budget: bytes allowed for the matrix plus the block products (default: half of
            the available memory of the device).
        quiet: no progress bar when True.
        chunk_size: columns per block product (default: from the budget, at most 512).

    Returns:
        ``(p, p)`` symmetric tensor in ``model.parameters()`` order.

    Raises:
        ValueError: if the p x p matrix does not fit in the budget.
    """
    fn = "hbk.exact_hessian"
    op = HessianOperator(model, loss_fn, data, params=params, method=method, dtype=dtype)
    p = op.dim
    elem = torch.finfo(op.dtype).bits // 8
    need = p * p * elem
    if memory_budget is None:
        memory_budget = _available_bytes(op.device) // 2
    if need > memory_budget:
        raise ValueError(
            f"{fn}: expected the {p} x {p} Hessian ({need / 2**30:.2f} GiB in {op.dtype}) to fit in "
            f"the memory budget, got a budget of {memory_budget / 2**30:.2f} GiB; use hbk.hessian_eigs "
            "for a few eigenpairs instead"
        )
    if chunk_size is None:
        per_col = elem * (4 * p + 4 * _activation_numel(op))
        chunk_size = int(max(1, min(p, 512, (memory_budget - need) // max(per_col, 1))))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: expected chunk_size to be a positive int, got {chunk_size!r}")
    H = torch.empty(p, p, dtype=op.dtype, device=op.device)
    # Chunks never straddle two parameters (an identity chunk then stays in one layer).
    bounds = np.cumsum([0] + op.numels).tolist()
    chunks = [(c0, min(c0 + chunk_size, b1)) for b0, b1 in itertools.pairwise(bounds)
              for c0 in range(b0, b1, chunk_size)]
    lower = op.exploits_symmetry
    if not quiet:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=fn, unit="chunk")
    for c0, c1 in chunks:
        if lower:
            H[c0:, c0:c1] = op.columns(c0, c1, lower=True)[c0:]
        else:
            H[:, c0:c1] = op.columns(c0, c1)
    op.release()
    if lower:
        _mirror_lower_(H)
    else:
        _symmetrize_(H)
    return H


def _mirror_lower_(H: torch.Tensor, tile: int = 1024) -> None:
    """``H[i, j] <- H[j, i]`` for ``i < j`` (copy the lower triangle up), tile by tile."""
    p = H.shape[0]
    for i0 in range(0, p, tile):
        i1 = min(p, i0 + tile)
        d = H[i0:i1, i0:i1]
        d.copy_(torch.tril(d) + torch.tril(d, -1).t())
        for j0 in range(i1, p, tile):
            j1 = min(p, j0 + tile)
            H[i0:i1, j0:j1] = H[j0:j1, i0:i1].t()


def _symmetrize_(H: torch.Tensor, tile: int = 1024) -> None:
    """``H <- (H + H^T) / 2`` in place, one pair of tiles at a time (no p x p temporary)."""
    p = H.shape[0]
    for i0 in range(0, p, tile):
        i1 = min(p, i0 + tile)
        d = H[i0:i1, i0:i1]
        d.copy_((d + d.t()) * 0.5)
        for j0 in range(i1, p, tile):
            j1 = min(p, j0 + tile)
            m = (H[i0:i1, j0:j1] + H[j0:j1, i0:i1].t()) * 0.5
            H[i0:i1, j0:j1] = m
            H[j0:j1, i0:i1] = m.t()


def hessian_spectrum(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full spectrum of the exact Hessian.

    Args:
        model, loss_fn, data: as for :func:`exact_hessian`.
        dtype: dtype of the Hessian and of the eigensolver (float64 by default: a float32
            ``eigh`` of the paper's 10,703 x 10,703 Hessian once returned NaN).
        **kwargs: forwarded to :func:`exact_hessian` (params, memory_budget, quiet, ...).

    Returns:
        ``(eigenvalues (p,) descending, eigenvectors (p, p))``, eigenvector ``i`` is column
        ``i``, entries in ``model.parameters()`` order.

    Raises:
        FloatingPointError: if the eigensolver returns non-finite values twice (LAPACK
            ``syevd`` through torch, then scipy's ``syevr``).
    """
    H = exact_hessian(model, loss_fn, data, dtype=dtype, **kwargs)
    evals, evecs = torch.linalg.eigh(H)
    if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
        import scipy.linalg

        w, v = scipy.linalg.eigh(H.cpu().numpy(), driver="evr")
        evals = torch.from_numpy(w).to(H.device)
        evecs = torch.from_numpy(v).to(H.device)
        if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
            raise FloatingPointError(
                "hbk.hessian_spectrum: expected finite eigenpairs, got NaN/inf from both "
                "torch.linalg.eigh and scipy.linalg.eigh(driver='evr')"
            )
    return evals.flip(0), evecs.flip(1)


# ------------------------------------------------------------------------------ trace
@dataclass
class TraceResult(JsonResult):
    """Stochastic trace estimate.

    Attributes:
        estimate: the trace estimate.
        std_error: standard error of the stochastic part (Hutchinson: of the whole estimate;
            Hutch++: of the residual Hutchinson term; the low-rank part is deterministic).
        num_matvecs: operator products used.
        method: "hutchinson" or "hutch++".
        num_probes: probe vectors used.
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    num_probes: int


def _rademacher(dim: int, m: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    z = torch.randint(0, 2, (dim, m), generator=gen, dtype=torch.int8)
    return (z.to(dtype) * 2 - 1).to(device)


def _blocked(op, V: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.cat([op.matvec(V[:, i:i + block_size]) for i in range(0, V.shape[1], block_size)], 1)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))
    return gen


def hessian_trace(
    op: Any,
    num_probes: int = 99,
    method: str = "hutch++",
    seed: int | None = None,
    block_size: int = 33,
) -> TraceResult:
    """Stochastic estimate of ``tr(H)`` with Rademacher probes, in blocks.

    Hutch++ (Meyer, Musco, Musco, Woodruff 2021): a third of the products builds a sketch
    ``Q = orth(H S)`` whose trace ``tr(Q^T H Q)`` is exact, the last third estimates the trace
    of the deflated rest by Hutchinson; its error falls as 1/m instead of 1/sqrt(m).

    Args:
        op: an operator with ``.dim`` and a block ``.matvec`` (HessianOperator,
            MatrixOperator) or a square tensor.
        num_probes: products to spend (Hutch++: ``s = num_probes // 3`` sketch vectors,
            ``s`` deflation products and ``num_probes - 2 s`` Hutchinson probes).
        method: "hutch++" or "hutchinson".
        seed: probe seed (None: drawn from torch's global generator).
        block_size: vectors per operator call.

    Returns:
        :class:`TraceResult`.
    """
    fn = "hbk.hessian_trace"
    op = _as_operator(fn, op)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"{fn}: expected method 'hutch++' or 'hutchinson', got {method!r}")
    min_probes = 3 if method == "hutch++" else 1
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < min_probes:
        raise ValueError(f"{fn}: expected num_probes >= {min_probes} for {method}, got {num_probes!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{fn}: expected block_size >= 1, got {block_size!r}")
    dtype = getattr(op, "dtype", torch.float64)
    device = getattr(op, "device", torch.device("cpu"))
    gen = _generator(seed)
    dim = op.dim
    if method == "hutchinson":
        Z = _rademacher(dim, num_probes, gen, dtype, device)
        vals = (Z * _blocked(op, Z, block_size)).sum(0).double()
        est = float(vals.mean())
        se = float(vals.std() / math.sqrt(num_probes)) if num_probes > 1 else float("nan")
        return TraceResult(est, se, num_probes, method, num_probes)
    s = min(num_probes // 3, dim)
    g = num_probes - 2 * s
    S = _rademacher(dim, s, gen, dtype, device)
    Q, _ = torch.linalg.qr(_blocked(op, S, block_size).double())
    Q = Q.to(dtype)
    t_low = float(torch.sum(Q * _blocked(op, Q, block_size)).double())
    G = _rademacher(dim, g, gen, dtype, device)
    G = G - Q @ (Q.t() @ G)
    vals = (G * _blocked(op, G, block_size)).sum(0).double()
    est = t_low + float(vals.mean())
    se = float(vals.std() / math.sqrt(g)) if g > 1 else float("nan")
    return TraceResult(est, se, 2 * s + g, method, num_probes)


# ------------------------------------------------------------------------------ density
@dataclass
class SpectralDensity(JsonResult):
    """Eigenvalue density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``(g,)`` points.
        density: ``(g,)`` Gaussian-broadened density (integrates to about 1 over a grid that
            covers the spectrum).
        nodes: ``(num_probes, m)`` Ritz values (quadrature nodes) per probe.
        weights: ``(num_probes, m)`` quadrature weights per probe (each row sums to 1).
        sigma: Gaussian width.
        num_matvecs: operator products used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_matvecs: int


def spectral_density(
    op: Any,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    block_size: int | None = None,
    quiet: bool = True,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe z, ``m`` Lanczos steps (C++ driver, full reorthogonalisation,
    all probes of a block advanced by one block product per step) give a tridiagonal ``T``
    with eigenpairs ``(theta_j, u_j)``; ``z^T f(H) z / |z|^2 ~ sum_j u_j[0]^2 f(theta_j)``.
    The density is ``(1 / num_probes) sum_probes sum_j u_j[0]^2 N(t; theta_j, sigma^2)``.

    Args:
        op: operator with ``.dim`` and a block ``.matvec``, or a square tensor.
        num_probes: number of probes.
        lanczos_steps: Lanczos steps per probe (at most dim).
        grid: ``(g,)`` tensor of points, or a number of points (default 1000) spread over the
            Ritz values +- 5 sigma.
        sigma: Gaussian width (default: 1 % of the Ritz-value range, or 1e-3 if it is 0).
        seed: probe seed.
        block_size: probes per operator call (default: all).
        quiet: no progress bar when True.

    Returns:
        :class:`SpectralDensity`.
    """
    fn = "hbk.spectral_density"
    op = _as_operator(fn, op)
    dim = op.dim
    for name, val in (("num_probes", num_probes), ("lanczos_steps", lanczos_steps)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{fn}: expected {name} to be a positive int, got {val!r}")
    if lanczos_steps > dim:
        raise ValueError(f"{fn}: expected lanczos_steps <= dim = {dim}, got {lanczos_steps}")
    if sigma is not None and not (sigma > 0):
        raise ValueError(f"{fn}: expected sigma > 0, got {sigma!r}")
    block_size = num_probes if block_size is None else block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{fn}: expected block_size to be a positive int, got {block_size!r}")
    dtype = getattr(op, "dtype", torch.float64)
    device = getattr(op, "device", torch.device("cpu"))
    gen = _generator(seed)
    Z = _rademacher(dim, num_probes, gen, dtype, device)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_probes * lanczos_steps, desc=fn, unit="mv", leave=False)
    done = [0]

    def progress(n: int, _c: int, _r: int) -> None:
        if bar is not None:
            bar.update(done[0] + n - bar.n)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return op.matvec(v)

    alphas, betas = [], []
    try:
        for c0 in range(0, num_probes, block_size):
            block = Z[:, c0:c0 + block_size]
            a, b = _C.lanczos_tridiagonal(matvec, block, lanczos_steps, progress)
            done[0] += block.shape[1] * lanczos_steps
            alphas.append(a)
            betas.append(b)
    finally:
        if bar is not None:
            bar.close()
    alpha = torch.cat(alphas)
    beta = torch.cat(betas)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta, U = torch.linalg.eigh(T)
    w = U[:, 0, :] ** 2
    lo, hi = float(theta.min()), float(theta.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(hi))
    if grid is None or isinstance(grid, int):
        npts = 1000 if grid is None else grid
        if npts < 2:
            raise ValueError(f"{fn}: expected at least 2 grid points, got {npts}")
        grid_t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, npts, dtype=torch.float64)
    elif isinstance(grid, torch.Tensor) and grid.dim() == 1:
        grid_t = grid.detach().to("cpu", torch.float64)
    else:
        raise ValueError(f"{fn}: expected grid to be a 1-D tensor or a number of points, got {grid!r}")
    diff = grid_t[:, None, None] - theta[None]  # (g, probes, m)
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * w[None]).sum((1, 2)) / num_probes
    return SpectralDensity(grid_t, density, theta, w, float(sigma), num_probes * lanczos_steps)
