"""Closed-form products for a :class:`~hbkernels.hvp.chain.LinearChain` (Pearlmutter's R-op).

For ``z_l = a_l W_l^T + b_l``, ``a_{l+1} = sigma(z_l)`` and output ``z_{L-1}``: forward
tangents ``Rz_l = Ra_l W_l^T + a_l dW_l^T + db_l``, ``Ra_{l+1} = sigma'(z_l) Rz_l``; the
loss Hessian in output space (the closed form of :meth:`Loss.output_hessian`, else autograd
on the small ``(n, C)`` loss graph); then backward ``RgW_l = Rdelta_l^T a_l + delta_l^T
Ra_l``, ``Re_l = Rdelta_{l+1} W_{l+1} + delta_{l+1} dW_{l+1}``, ``Rdelta_l = sigma'(z_l) Re_l
+ sigma''(z_l) e_l Rz_l``. The Gauss-Newton product (``ggn=True``) is the same pass without
the terms in ``delta`` and ``sigma''``. Forward and backward quantities are computed once per
batch (kept for in-memory data); a block of ``b`` directions is a few large GEMMs per layer.
Identity columns (:meth:`ChainProducts.columns`) start from a sparse tangent and, with
``lower=True``, stop the backward pass at the column's layer (the rest follows by symmetry).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import fail
from ..data import Batch
from .base import HVPMethod, output_hessian
from .chain import LinearChain, activation_derivatives

__all__ = ["ChainProducts", "chain_unfit_reason"]


def chain_unfit_reason(obj, chain: LinearChain, batch: Batch) -> str | None:
    """Why the chain's closed forms cannot serve this objective's batch (None: they can)."""
    if obj.call.user_forward is not None:
        return "a custom forward="
    x = batch.inputs[0] if isinstance(batch.inputs, tuple) and len(batch.inputs) == 1 else None
    if x is None or not x.is_floating_point():
        return "batches other than (X, y) with floating X"
    if x.dim() < 2 or (x.dim() != 2 and not chain.flatten) or x[0].numel() != chain.in_features:
        return f"inputs of shape {tuple(x.shape)} for a chain of {chain.in_features} inputs"
    return None


def prepared_batches(method):
    """The per-batch quantities ``method._prepare(batch)`` for every batch, kept in
    ``method._cache`` for in-memory data (re-read from a loader otherwise)."""
    if method._cache is not None:
        yield from method._cache
        return
    keep = [] if method.obj.data.in_memory else None
    for batch in method.obj.batches():
        c = method._prepare(batch)
        if keep is not None:
            keep.append(c)
        yield c
    if keep is not None:
        method._cache = keep


class ChainProducts(HVPMethod):
    """Hessian (or, with ``ggn``, Gauss-Newton) products of a Linear/activation chain."""

    name = "linear_chain"
    exploits_symmetry = True

    def __init__(self, objective, chain: LinearChain, ggn: bool = False) -> None:
        super().__init__(objective)
        self.ggn = ggn
        self.W = [lin.weight.detach() for lin in chain.layers]
        self.b = [None if lin.bias is None else lin.bias.detach() for lin in chain.layers]
        self.acts = list(chain.activations)
        self.chain = chain
        self.L = len(self.W)
        where = {}
        for l, lin in enumerate(chain.layers):
            where[id(lin.weight)] = (l, "W")
            if lin.bias is not None:
                where[id(lin.bias)] = (l, "b")
        named = dict(objective.model.named_parameters())
        self.where = [where[id(named[n])] for n in objective.names]
        # lower=True relies on the flat order being the forward order (W_l before b_l)
        order = [(l, kind == "b") for l, kind in self.where]
        self.exploits_symmetry = order == sorted(order)
        self._cache: list[dict] | None = None
        first = objective.data.first()
        reason = chain_unfit_reason(objective, chain, first)
        if reason is not None:
            fail(objective.fn, "data the closed-form chain can take (one tensor input "
                 "of the chain's width, no forward=) for method='linear_chain'", reason, raw=True)
        c = self._prepare(first)
        with torch.no_grad():
            want = objective.outputs(objective.params, first)[0]
        if want.shape != c["out"].shape or not torch.allclose(want, c["out"], rtol=1e-4, atol=1e-6):
            fail(objective.fn, "a linear_chain() description that computes the model's "
                 "outputs", f"outputs that differ (max |diff| {float((want - c['out']).abs().max()):.3g})"
                 if want.shape == c["out"].shape else f"shape {tuple(c['out'].shape)} vs "
                 f"{tuple(want.shape)}", raw=True)

    # ------------------------------------------------------------------ per-batch quantities
    def _prepared(self):
        return prepared_batches(self)

    def _prepare(self, batch: Batch) -> dict[str, Any]:
        reason = chain_unfit_reason(self.obj, self.chain, batch)
        if reason is not None:
            fail(self.obj.fn, "every batch in the form of the first", reason, raw=True)
        x, y = batch.inputs[0], batch.targets
        w = self.obj.weight(y)
        a = [x.reshape(x.shape[0], -1)]
        s1, s2 = [], []
        with torch.no_grad():
            for l in range(self.L):
                z = a[l] @ self.W[l].T
                if self.b[l] is not None:
                    z = z + self.b[l]
                if l < self.L - 1:
                    act, d1, d2 = activation_derivatives(self.acts[l], z)
                    a.append(act)
                    s1.append(d1)
                    s2.append(d2)
        c = {"a": a, "s1": s1, "s2": s2, "out": z, "hout": output_hessian(self.obj, z, y, w)}
        if not self.ggn:
            o = z.detach().requires_grad_(True)
            with torch.enable_grad():
                gout = torch.autograd.grad(self.obj.loss(o, y) * w, o)[0]
            delta, e = [None] * self.L, [None] * (self.L - 1)
            delta[-1] = gout
            for l in range(self.L - 1, 0, -1):
                e[l - 1] = delta[l] @ self.W[l]
                delta[l - 1] = s1[l - 1] * e[l - 1]
            c.update(delta=delta, e=e)
        return c

    # ------------------------------------------------------------------ one batch
    def _forward_tangents(self, c: dict, dW: list, db: list, unit: tuple | None, bsz: int):
        """``(Ra, Rz)`` per layer; a tangent is dense ``(n, b, d)`` or sparse
        ``("sparse", values (n, b), column per direction (b,))`` for identity directions."""
        a, s1 = c["a"], c["s1"]
        L, n, dt, dev = self.L, a[0].shape[0], a[0].dtype, a[0].device
        smooth = [act != "relu" for act in self.acts]
        l0 = unit[0] if unit is not None else -1
        Ra: list = [None] * L
        Rz: list = [None] * L  # kept where a smooth activation (or the output) needs it
        for l in range(L):
            out_l, in_l = self.W[l].shape
            if l == l0:
                _, kind, urows, ucols = unit
                vals = a[l][:, ucols] if kind == "W" else torch.ones(n, bsz, dtype=dt, device=dev)
                if l < L - 1:
                    if smooth[l]:
                        Rz[l] = ("sparse", vals, urows)
                    Ra[l + 1] = ("sparse", vals * s1[l][:, urows], urows)
                    continue
                rz = torch.zeros(n, bsz, out_l, dtype=dt, device=dev)
                rz[:, torch.arange(bsz, device=dev), urows] = vals
            else:
                rz, ra = None, Ra[l]
                if isinstance(ra, tuple):
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
            if l == L - 1 or smooth[l]:
                Rz[l] = rz
            if l < L - 1:
                Ra[l + 1] = rz * s1[l][:, None, :] if smooth[l] else rz.mul_(s1[l][:, None, :])
        return Ra, Rz

    def _one_batch(self, c: dict, dW: list, db: list, unit: tuple | None, lower: bool):
        """One batch's products per layer: ``(b, out, in)`` and ``(b, out)`` (or None)."""
        a, s1 = c["a"], c["s1"]
        L, n, dt, dev = self.L, a[0].shape[0], a[0].dtype, a[0].device
        bsz = unit[2].numel() if unit is not None else next(t.shape[0] for t in dW + db if t is not None)
        l0 = unit[0] if unit is not None else -1
        Ra, Rz = self._forward_tangents(c, dW, db, unit, bsz)
        Rd = None if Rz[L - 1] is None else c["hout"](Rz[L - 1])
        second = not self.ggn
        gW: list = [None] * L
        gb: list = [None] * L
        ar = torch.arange(bsz, device=dev)
        for l in range(L - 1, -1, -1):
            out_l, in_l = self.W[l].shape
            g = None
            if lower and l == l0:  # rows above the first direction's follow by symmetry
                if Rd is not None:
                    gb[l] = Rd.sum(0)
                    if unit[1] == "W":
                        o_min = int(unit[2].min())
                        part = Rd[:, :, o_min:].reshape(n, bsz * (out_l - o_min))
                        g = torch.zeros(bsz, out_l, in_l, dtype=dt, device=dev)
                        g[:, o_min:, :] = (a[l].T @ part).view(in_l, bsz, out_l - o_min).permute(1, 2, 0)
                        gW[l] = g
                break
            if Rd is not None:  # Rdelta^T a_l
                g = (a[l].T @ Rd.reshape(n, bsz * out_l)).view(in_l, bsz, out_l).permute(1, 2, 0)
                gb[l] = Rd.sum(0)
            ra = Ra[l]
            if second and isinstance(ra, tuple):  # delta_l^T Ra_l: one column per direction
                m = c["delta"][l].T @ ra[1]
                g = torch.zeros(bsz, out_l, in_l, dtype=dt, device=dev) if g is None else g.contiguous()
                g[ar, :, ra[2]] += m.T
            elif second and ra is not None:
                t = (c["delta"][l].T @ ra.reshape(n, bsz * in_l)).view(out_l, bsz, in_l).transpose(0, 1)
                g = t if g is None else g + t
            gW[l] = g
            if l == 0:
                break
            re = None if Rd is None else (Rd.reshape(n * bsz, out_l) @ self.W[l]).view(n, bsz, in_l)
            if second and dW[l] is not None:  # delta_l dW_l
                t = (c["delta"][l] @ dW[l].transpose(0, 1).reshape(out_l, bsz * in_l)).view(n, bsz, in_l)
                re = t if re is None else re.add_(t)
            if second and l == l0 and unit[1] == "W":  # delta_l dW_l for identity directions
                if re is None:
                    re = torch.zeros(n, bsz, in_l, dtype=dt, device=dev)
                re[:, ar, unit[3]] += c["delta"][l][:, unit[2]]
            rd = None if re is None else re.mul_(s1[l - 1][:, None, :])
            rz = Rz[l - 1]
            if second and rz is not None:  # sigma'' e Rz (smooth activations only)
                se = c["s2"][l - 1] * c["e"][l - 1]
                if isinstance(rz, tuple):
                    if rd is None:
                        rd = torch.zeros(n, bsz, in_l, dtype=dt, device=dev)
                    rd[:, ar, rz[2]] += se[:, rz[2]] * rz[1]
                else:
                    t = se[:, None, :] * rz
                    rd = t if rd is None else rd.add_(t)
            Rd = rd
        return gW, gb

    # ------------------------------------------------------------------ flat interface
    def _flat(self, parts: list | None, b: int, unit: tuple | None = None,
              lower: bool = False) -> torch.Tensor:
        """``(b, p)`` rows: products summed over batches, in the objective's parameter order."""
        dW: list = [None] * self.L
        db: list = [None] * self.L
        if parts is not None:
            for (l, kind), t in zip(self.where, parts):
                (dW if kind == "W" else db)[l] = t
        tot_W: list = [None] * self.L
        tot_b: list = [None] * self.L
        for c in self._prepared():
            gW, gb = self._one_batch(c, dW, db, unit, lower)
            for tot, new in ((tot_W, gW), (tot_b, gb)):
                for l in range(self.L):
                    if new[l] is not None:
                        tot[l] = new[l] if tot[l] is None else tot[l] + new[l]
        obj = self.obj
        out = []
        for (l, kind), shape in zip(self.where, obj.shapes):
            t = tot_W[l] if kind == "W" else tot_b[l]
            out.append(torch.zeros(b, *shape, dtype=obj.dtype, device=obj.device) if t is None else t)
        return obj.join(out, b)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        rows = V.t()
        return self._flat(list(self.obj.split(rows).values()), rows.shape[0]).t()

    def columns(self, j0: int, j1: int, lower: bool = False) -> torch.Tensor:
        obj = self.obj
        lower = lower and self.exploits_symmetry
        blocks, off = [], 0
        for i, numel in enumerate(obj.numels):
            lo, hi = max(j0, off), min(j1, off + numel)
            if lo < hi:
                l, kind = self.where[i]
                idx = torch.arange(lo - off, hi - off, device=obj.device)
                in_l = self.W[l].shape[1]
                unit = (l, kind, idx // in_l, idx % in_l) if kind == "W" else (l, kind, idx, None)
                blocks.append(self._flat(None, hi - lo, unit, lower))
            off += numel
        return torch.cat(blocks).t()

    def release(self) -> None:
        self._cache = None
