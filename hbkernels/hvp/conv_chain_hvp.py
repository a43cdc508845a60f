"""Closed-form products for a :class:`~hbkernels.hvp.conv_chain.ConvChain` (Pearlmutter's R-op).

For layers ``z_{k+1} = f_k(z_k; theta_k)`` the forward tangents are ``Rz_{k+1} = J_z f_k Rz_k
+ J_theta f_k d theta_k``, the loss Hessian in output space turns the output tangent into
``Rg_L`` (the closed form of :meth:`Loss.output_hessian`, else autograd on the small loss
graph), and the backward pass is ``Rg_k = J_z f_k^T Rg_{k+1} + (d J_z f_k^T) g_{k+1}``,
``H theta_k = J_theta f_k^T Rg_{k+1} + (d J_theta f_k^T) g_{k+1}`` with the first-order
gradients ``g`` of the forward pass. Per layer:

* Conv2d / Linear (bilinear in input and weight): ``Rz' = conv(Rz, W) + conv(z, dW) + db``;
  ``HW = Rg' * z + g' * Rz`` (weight gradients), ``Rg = conv^T(Rg', W) + conv^T(g', dW)``;
* ReLU / Tanh / Sigmoid: ``Rz' = s' Rz``, ``Rg = s' Rg' + s'' g' Rz``;
* MaxPool2d: piecewise linear with the forward's argmax routing: ``Rz'`` gathers ``Rz`` at
  the argmax indices, ``Rg`` scatters ``Rg'`` back to them (what autograd differentiates);
* AvgPool2d and Flatten: linear (their own adjoint ops).

A block of ``b`` directions travels as ``(n, b, ...)`` tangents: convolutions with the input
tangents run over ``n * b`` images with the layer's weight, and those with the ``b`` weight
directions run as one convolution whose ``b * C_out`` output (or ``b * C_in`` input) channels
stack the directions, so every term is one torch convolution (oneDNN in float32) whatever
``b``. The Gauss-Newton product (``ggn=True``) drops the terms in ``g`` and ``s''``.
Forward and first-order quantities are computed once per batch (kept for in-memory data).

float64 on CPU: torch's float64 convolutions skip oneDNN (a slow im2col path, ~5x the
float32 cost). For in-memory data the chain runs the terms against the fixed forward inputs
(``conv(z, dW)`` and ``Rg' * z``) as batched GEMMs on the unfolded patches of ``z``, cached
per batch up to :data:`UNFOLD_BYTES` per operator (past that: the convolutions, same result);
the terms with input tangents stay convolutions. Measured (``bench/results/conv_chain.md``):
a float64 LeNet-5 HVP costs 0.5 float64 gradients and 2.3-2.9x a float32 HVP; float64
products agree with autograd's Hessian to 1e-12 relative. float32 keeps the convolutions
(oneDNN beats the GEMM formulation there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.nn.modules.utils import _pair

from ..checks import fail
from ..data import Batch
from .base import HVPMethod, output_hessian
from .chain import activation_derivatives
from .chain_hvp import prepared_batches
from .conv_chain import _ACTS, ConvChain

__all__ = ["ConvChainProducts", "conv_chain_unfit_reason"]

_NEEDS_4D = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
UNFOLD_BYTES = 1 << 30  # float64 patch caches (all layers and batches of one operator)


def conv_chain_unfit_reason(obj, chain: ConvChain, batch: Batch) -> str | None:
    """Why the chain's closed forms cannot serve this objective's batch (None: they can):
    runs the chain on the batch's first sample to check each layer's input shape."""
    if obj.call.user_forward is not None:
        return "a custom forward="
    x = batch.inputs[0] if isinstance(batch.inputs, tuple) and len(batch.inputs) == 1 else None
    if x is None or not x.is_floating_point():
        return "batches other than (X, y) with floating X"
    h = x[:1]
    with torch.no_grad():
        for i, m in enumerate(chain.layers):
            if (isinstance(m, _NEEDS_4D) and h.dim() != 4) or (type(m) is nn.Linear and h.dim() != 2):
                return f"{type(m).__name__} at position {i} on inputs of shape {tuple(h.shape[1:])}"
            try:
                h = m(h.to(m.weight.dtype) if type(m) in (nn.Conv2d, nn.Linear) else h)
            except RuntimeError as err:
                return f"{type(m).__name__} at position {i} failing on inputs of shape " \
                       f"{tuple(h.shape[1:])}: {str(err).splitlines()[0][:120]}"
    return None


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a.add_(b)


class _Layer:
    """One layer's closed forms; tangents are ``(n, b, *features)``."""

    params = False

    def __init__(self, m: nn.Module) -> None:
        self.m = m

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.m(z), None

    def backward(self, z, st, g: torch.Tensor) -> torch.Tensor:
        """First-order gradient at the input from ``g`` at the output."""
        raise NotImplementedError

    def tangent(self, z, st, Rz, dW, db, b: int):
        raise NotImplementedError

    def second(self, z, st, Rg, Rz, g, dW, db, need_in: bool, second: bool, b: int):
        """``(Rg at the input or None, weight product, bias product)``."""
        raise NotImplementedError


class _Affine(_Layer):
    """Conv2d or Linear: ``W`` with optional bias."""

    params = True

    def __init__(self, m: nn.Module) -> None:
        super().__init__(m)
        self.W = m.weight.detach()
        self.bias = None if m.bias is None else m.bias.detach()
        self.conv = type(m) is nn.Conv2d
        self.unfold = None  # float64: a callable(bytes) -> bool granting a patch cache
        if self.conv:
            self.stride, self.padding = _pair(m.stride), _pair(m.padding)

    def _fwd(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, W, None, self.stride, self.padding)
        return x @ W.T

    def _in(self, size, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``x -> _fwd(x, W)`` applied to ``g``, for inputs of shape ``size``."""
        if self.conv:
            return conv2d_input(size, W, g, self.stride, self.padding)
        return g @ W

    def _w(self, x: torch.Tensor, wshape, g: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``W -> _fwd(x, W)`` applied to ``g`` (weight of shape ``wshape``)."""
        if self.conv:
            return conv2d_weight(x, wshape, g, self.stride, self.padding)
        return g.T @ x

    def forward(self, z):
        out = self._fwd(z, self.W)
        if self.bias is not None:
            out = out + (self.bias.view(-1, 1, 1) if self.conv else self.bias)
        U = None
        if self.conv and self.unfold is not None and \
                self.unfold(out[:, :1].numel() * self.W[0].numel() * z.element_size()):
            U = F.unfold(z, self.W.shape[2:], padding=self.padding, stride=self.stride)
        return out, (tuple(out.shape[1:]), U)

    def backward(self, z, st, g):
        return self._in(z.shape, self.W, g)

    def tangent(self, z, st, Rz, dW, db, b):
        n, co = z.shape[0], self.W.shape[0]
        out = None
        if Rz is not None:
            out = self._fwd(Rz.flatten(0, 1), self.W).unflatten(0, (n, b))
        shape, U = st
        if dW is not None and U is not None:  # GEMMs on the cached patches (float64)
            t = torch.matmul(dW.reshape(b * co, -1), U).view(n, b, *shape)
            out = _add(out, t)
        elif dW is not None:  # the b weight directions stacked as b * C_out output channels
            out = _add(out, self._fwd(z, dW.flatten(0, 1)).unflatten(1, (b, co)))
        if db is not None:
            d = db.view(1, b, co, *([1] * (len(shape) - 1)))
            out = d.expand(n, b, *shape).clone() if out is None else out.add_(d)
        return out

    def _both(self, grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor):
        """``(adjoint in the input, adjoint in the weight)`` of ``conv(x, W)`` applied to
        ``grad``: one ``convolution_backward`` call for the pair."""
        gin, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, W, None, list(self.stride), list(self.padding), [1, 1], False, [0, 0], 1,
            [True, True, False])
        return gin, gw

    def second(self, z, st, Rg, Rz, g, dW, db, need_in, second, b):
        n, (co, ci) = z.shape[0], self.W.shape[:2]
        ks = tuple(self.W.shape[2:])
        gW = gb = Rin = None
        if Rg is not None:
            gb = Rg.sum((0, *range(3, Rg.dim())))
            U = st[1]
            if U is not None:  # Rg' * z as GEMMs on the cached patches (float64)
                gW = (Rg.reshape(n, b * co, -1) @ U.transpose(1, 2)).sum(0).view(b, co, ci, *ks)
                if need_in:
                    Rin = self._in((n * b, *z.shape[1:]), self.W, Rg.flatten(0, 1)).unflatten(0, (n, b))
            elif self.conv and need_in and b == 1:  # conv^T(Rg', W) and Rg' * z in one call
                gin, gw = self._both(Rg[:, 0], z, self.W)
                Rin, gW = gin.unsqueeze(1), gw.unsqueeze(0)
            else:  # Rg' * z, the b directions as b * C_out output channels
                gW = self._w(z, (b * co, ci, *ks), Rg.flatten(1, 2)).view(b, co, ci, *ks)
                if need_in:
                    Rin = self._in((n * b, *z.shape[1:]), self.W, Rg.flatten(0, 1)).unflatten(0, (n, b))
        if not second:
            return Rin, gW, gb
        both = self.conv and need_in and Rz is not None and dW is not None
        Wt = None if dW is None else dW.transpose(0, 1).reshape(co, b * ci, *ks)
        if both:  # conv^T(g', dW) and g' * Rz in one call, the b directions as b * C_in channels
            gin, gw = self._both(g, Rz.flatten(1, 2), Wt)
            Rin = _add(Rin, gin.unflatten(1, (b, ci)))
            gW = _add(gW, gw.view(co, b, ci, *ks).transpose(0, 1))
            return Rin, gW, gb
        if Rz is not None:  # g' * Rz
            t = self._w(Rz.flatten(1, 2), (co, b * ci, *ks), g).view(co, b, ci, *ks)
            gW = _add(gW, t.transpose(0, 1))
        if need_in and dW is not None:  # conv^T(g', dW)
            Rin = _add(Rin, self._in((n, b * ci, *z.shape[2:]), Wt, g).unflatten(1, (b, ci)))
        return Rin, gW, gb


class _Act(_Layer):
    def __init__(self, m: nn.Module) -> None:
        super().__init__(m)
        self.name = _ACTS[type(m)]
        self.smooth = self.name != "relu"
        self.defer = False  # a ReLU before a MaxPool2d: the pool applies the mask (4x smaller)

    def forward(self, z):
        a, d1, d2 = activation_derivatives(self.name, z)
        return a, (d1, d2)

    def backward(self, z, st, g):
        return st[0] * g

    def tangent(self, z, st, Rz, dW, db, b):
        if self.defer:
            return Rz
        return None if Rz is None else Rz * st[0].unsqueeze(1)

    def second(self, z, st, Rg, Rz, g, dW, db, need_in, second, b):
        if self.defer:
            return Rg, None, None
        Rin = None if Rg is None else Rg * st[0].unsqueeze(1)
        if second and self.smooth and Rz is not None:
            Rin = _add(Rin, (st[1] * g).unsqueeze(1) * Rz)
        return Rin, None, None


class _MaxPool(_Layer):
    """With ``relu_mask`` (the layer before is a deferred ReLU), the tangents also take the
    ReLU's mask, read at the argmax: ``relu'(z)`` there is ``out > 0``."""

    relu_mask = False

    def forward(self, z):
        m = self.m
        out, idx = F.max_pool2d(z, m.kernel_size, m.stride, m.padding, m.dilation,
                                ceil_mode=m.ceil_mode, return_indices=True)
        mask = (out > 0).to(out.dtype).unsqueeze(1) if self.relu_mask else None
        return out, (idx.flatten(2), tuple(out.shape[2:]), mask)

    @staticmethod
    def _scatter(z, idx, R, lead):
        """Adjoint of the gather: ``R`` (``(*lead, C, H', W')``) added at the argmax."""
        c, h, w = z.shape[1:]
        out = R.new_zeros((*lead, c, h * w))
        out.scatter_add_(-1, idx.expand(*lead, c, idx.shape[-1]), R.flatten(-2))
        return out.view(*lead, c, h, w)

    def backward(self, z, st, g):
        return self._scatter(z, st[0], g, (z.shape[0],))

    def tangent(self, z, st, Rz, dW, db, b):
        if Rz is None:
            return None
        n, c = z.shape[:2]
        idx = st[0].unsqueeze(1).expand(n, b, c, st[0].shape[2])
        out = Rz.flatten(3).gather(3, idx).unflatten(3, st[1])
        return out if st[2] is None else out.mul_(st[2])

    def second(self, z, st, Rg, Rz, g, dW, db, need_in, second, b):
        if Rg is None or not need_in:
            return None, None, None
        if st[2] is not None:
            Rg = Rg * st[2]
        return self._scatter(z, st[0].unsqueeze(1), Rg, (z.shape[0], b)), None, None


class _AvgPool(_Layer):
    def __init__(self, m: nn.Module) -> None:
        super().__init__(m)
        k = _pair(m.kernel_size)
        self.args = (list(k), list(_pair(m.stride if m.stride is not None else k)),
                     list(_pair(m.padding)), m.ceil_mode, m.count_include_pad, m.divisor_override)

    def backward(self, z, st, g):
        return torch.ops.aten.avg_pool2d_backward(g, z.new_zeros(()).expand(z.shape), *self.args)

    def tangent(self, z, st, Rz, dW, db, b):
        return None if Rz is None else self.m(Rz.flatten(0, 1)).unflatten(0, (z.shape[0], b))

    def second(self, z, st, Rg, Rz, g, dW, db, need_in, second, b):
        if Rg is None or not need_in:
            return None, None, None
        n = z.shape[0]
        like = z.new_zeros(()).expand(n * b, *z.shape[1:])
        Rin = torch.ops.aten.avg_pool2d_backward(Rg.flatten(0, 1), like, *self.args)
        return Rin.unflatten(0, (n, b)), None, None


class _Flatten(_Layer):
    def backward(self, z, st, g):
        return g.view(z.shape)

    def tangent(self, z, st, Rz, dW, db, b):
        return None if Rz is None else Rz.flatten(2)

    def second(self, z, st, Rg, Rz, g, dW, db, need_in, second, b):
        if Rg is None or not need_in:
            return None, None, None
        return Rg.reshape(z.shape[0], b, *z.shape[1:]), None, None


def _layer(m: nn.Module) -> _Layer:
    kind = type(m)
    if kind in (nn.Conv2d, nn.Linear):
        return _Affine(m)
    if kind in _ACTS:
        return _Act(m)
    if kind is nn.MaxPool2d:
        return _MaxPool(m)
    if kind is nn.AvgPool2d:
        return _AvgPool(m)
    return _Flatten(m)


class ConvChainProducts(HVPMethod):
    """Hessian (or, with ``ggn``, Gauss-Newton) products of a convolutional chain."""

    name = "conv_chain"

    def __init__(self, objective, chain: ConvChain, ggn: bool = False) -> None:
        super().__init__(objective)
        self.ggn = ggn
        self.chain = chain
        self.layers = [_layer(m) for m in chain.layers]
        for a, pool in zip(self.layers[:-1], self.layers[1:]):
            if isinstance(a, _Act) and a.name == "relu" and isinstance(pool, _MaxPool):
                a.defer, pool.relu_mask = True, True
        where = {}
        for k, m in enumerate(chain.layers):
            if type(m) in (nn.Conv2d, nn.Linear):
                where[id(m.weight)] = (k, "W")
                if m.bias is not None:
                    where[id(m.bias)] = (k, "b")
        named = dict(objective.model.named_parameters())
        self.where = [where[id(named[n])] for n in objective.names]
        self.first = min(k for k, _ in self.where)
        self._unfold_left = UNFOLD_BYTES
        if objective.dtype == torch.float64 and objective.data.in_memory:
            for layer in self.layers:
                if isinstance(layer, _Affine) and layer.conv:
                    layer.unfold = self._grant  # no tangent before, no Rg needed below
        self._cache: list[dict] | None = None
        first = objective.data.first()
        reason = conv_chain_unfit_reason(objective, chain, first)
        if reason is not None:
            fail(objective.fn, "data the closed-form conv chain can take (one tensor input "
                 "the layers accept, no forward=) for method='conv_chain'", reason, raw=True)
        c = self._prepare(first)
        self._unfold_left = UNFOLD_BYTES  # the check's batch is prepared again with the rest
        with torch.no_grad():
            want = objective.outputs(objective.params, first)[0]
        got = c["out"]
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-6):
            fail(objective.fn, "a conv_chain() description that computes the model's outputs",
                 f"outputs that differ (max |diff| {float((want - got).abs().max()):.3g})"
                 if want.shape == got.shape else f"shape {tuple(got.shape)} vs "
                 f"{tuple(want.shape)}", raw=True)

    def _grant(self, nbytes: int) -> bool:
        """Whether a patch cache of ``nbytes`` fits in what is left of :data:`UNFOLD_BYTES`."""
        if nbytes > self._unfold_left:
            return False
        self._unfold_left -= nbytes
        return True

    # ------------------------------------------------------------------ per-batch quantities
    def _prepared(self):
        return prepared_batches(self)

    def _prepare(self, batch: Batch) -> dict[str, Any]:
        reason = conv_chain_unfit_reason(self.obj, self.chain, batch)
        if reason is not None:
            fail(self.obj.fn, "every batch in the form of the first", reason, raw=True)
        x, y = batch.inputs[0], batch.targets
        w = self.obj.weight(y)
        zs, sts = [x.to(self.obj.dtype)], []
        with torch.no_grad():
            for layer in self.layers:
                out, st = layer.forward(zs[-1])
                zs.append(out)
                sts.append(st)
        out = zs.pop()
        c = {"z": zs, "st": sts, "out": out, "hout": output_hessian(self.obj, out, y, w)}
        if not self.ggn:
            o = out.detach().requires_grad_(True)
            with torch.enable_grad():
                g = torch.autograd.grad(self.obj.loss(o, y) * w, o)[0]
            gs = [None] * len(self.layers)
            with torch.no_grad():
                for k in range(len(self.layers) - 1, self.first - 1, -1):
                    gs[k] = g
                    if k > self.first:
                        g = self.layers[k].backward(zs[k], sts[k], g)
            c["g"] = gs
        return c

    # ------------------------------------------------------------------ one batch
    def _one_batch(self, c: dict, dW: list, db: list, b: int):
        zs, sts, K = c["z"], c["st"], len(self.layers)
        T: list = [None] * (K + 1)  # tangent at the input of layer k (T[K]: the output's)
        for k in range(self.first, K):
            T[k + 1] = self.layers[k].tangent(zs[k], sts[k], T[k], dW[k], db[k], b)
        Rg = None if T[K] is None else c["hout"](T[K])
        second = not self.ggn
        gs = c.get("g")
        gW: list = [None] * K
        gb: list = [None] * K
        for k in range(K - 1, self.first - 1, -1):
            Rg, gW[k], gb[k] = self.layers[k].second(
                zs[k], sts[k], Rg, T[k], None if gs is None else gs[k], dW[k], db[k],
                k > self.first, second, b)
        return gW, gb

    # ------------------------------------------------------------------ flat interface
    def apply(self, V: torch.Tensor) -> torch.Tensor:
        rows = V.t()
        b, K = rows.shape[0], len(self.layers)
        dW: list = [None] * K
        db: list = [None] * K
        for (k, kind), t in zip(self.where, self.obj.split(rows).values()):
            (dW if kind == "W" else db)[k] = t.contiguous()
        tot_W: list = [None] * K
        tot_b: list = [None] * K
        with torch.no_grad():
            for c in self._prepared():
                gW, gb = self._one_batch(c, dW, db, b)
                for tot, new in ((tot_W, gW), (tot_b, gb)):
                    for k in range(K):
                        if new[k] is not None:
                            tot[k] = new[k] if tot[k] is None else tot[k] + new[k]
        obj = self.obj
        out = []
        for (k, kind), shape in zip(self.where, obj.shapes):
            t = tot_W[k] if kind == "W" else tot_b[k]
            out.append(torch.zeros(b, *shape, dtype=obj.dtype, device=obj.device) if t is None else t)
        return obj.join(out, b).t()

    def release(self) -> None:
        self._cache = None
        self._unfold_left = UNFOLD_BYTES
