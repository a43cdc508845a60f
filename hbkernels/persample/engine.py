"""The engine of one per-sample call, complete after construction.

Construction validates the model, the samples and the options, finds the layers with a factor
rule (:mod:`.capture`), probes 1-2 samples (which layers run, their positions ``T``, in-place
use of their tensors, the outputs and labels), assigns the remaining parameters to the
torch.func fallback (:mod:`.fallback`), chooses per factor pair the ghost form or
materialisation for the requested :class:`~.planning.Work` and sets the block size from the
memory budget (:mod:`.planning`). Afterwards :meth:`Engine.capture` gives the
:class:`Factors` of any sample block: one forward pass with hooks and one backward pass of the
block's *summed* per-sample losses w.r.t. the recorded layer outputs (row i is then sample i's
own gradient, as long as no layer couples samples).

**Scaling.** Each sample's factors are multiplied by a power of two ``s_i`` chosen from the
largest magnitude of its output gradients and fallback gradients (``scale=True``), so that the
kernels see numbers near 1: squared norms of gradients of size 1e-26 (a confident float32
model) neither underflow nor lose precision, and large gradients do not overflow. The products
are unscaled in float64 (norms ``/ s_i``, Gram ``/ (s_i s_j)``); cosines are scale invariant.
Powers of two make the scaling exact. Blocks whose peaks all lie in [2^-16, 2^16] are left
unscaled (bitwise the products of an unscaled engine). Limits: the scale comes from the output
gradients, so layer inputs whose squared norms leave the dtype's range (``|a| > 1e19`` in
float32) are not rescaled, and gradients below the dtype's smallest normal number have already
lost precision in the backward pass (the per-sample gradients themselves are not representable).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import FLOATS, describe, fail
from ..objective import check_model_is_deterministic
from ..params import trainable_parameters
from .capture import (
    Layer,
    Pair,
    Recorder,
    find_layers,
    graph_uses,
    layer_direct,
    layer_factors,
    positions,
)
from .fallback import Fallback
from .inputs import SampleInputs
from .options import Options, check_targets_against_outputs, given_targets, predicted_targets
from .planning import Work, block_size, choose_forms

__all__ = ["Engine", "Factors", "Layout"]

# Blocks whose output-gradient peaks all lie in [2^-_NO_SCALE, 2^_NO_SCALE] are not scaled.
_NO_SCALE = 16


@dataclass
class Factors:
    """Everything one sample block contributes, before any product with vectors.

    Attributes:
        n: samples in the block.
        A, D: per pair ``(n, T, d_in)`` / ``(n, T, d_out)`` (D scaled by ``scale``).
        fallback: per fallback parameter ``(n, numel)`` (scaled by ``scale``).
        direct: per parameter index of a direct layer, ``(n, numel)`` (scaled by ``scale``).
        scale: ``(n,)`` float64 powers of two ``s_i`` (ones without scaling).
        targets: the block's targets (the labels used).
    """

    n: int
    A: list[torch.Tensor | None]
    D: list[torch.Tensor | None]
    fallback: list[torch.Tensor]
    scale: torch.Tensor
    targets: torch.Tensor
    direct: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Segment:
    p_start: int
    size: int
    kind: str  # "w", "b" (of a pair), "f" (a fallback parameter), "p" (a direct parameter)
    index: int
    col: int = 0


@dataclass
class Layout:
    """Columns of a dense per-sample gradient block: segments of the flat parameter order."""

    segments: list[Segment]
    width: int = 0
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (col, p_start, size)

    def __post_init__(self) -> None:
        self.segments.sort(key=lambda s: s.p_start)
        col = 0
        for s in self.segments:
            s.col = col
            col += s.size
            if self.runs and self.runs[-1][1] + self.runs[-1][2] == s.p_start:
                c, p0, size = self.runs[-1]
                self.runs[-1] = (c, p0, size + s.size)
            else:
                self.runs.append((s.col, s.p_start, s.size))
        self.width = col


def _is_batch_coupled(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.training or m.running_mean is None
    return False


class Engine:
    """Validated inputs, the layer plan and the per-block factor capture of one call.

    Args:
        fn: the public function, for error messages.
        model: any ``nn.Module``; never modified (mode, hooks, ``.grad`` left as they were).
        inputs: samples in a form of :class:`~.inputs.SampleInputs`.
        opts: the validated options.
        work: the products of the pass (they decide the per-pair forms and the block size).
        scale: scale each sample's factors (see the module docstring).

    Attributes:
        n, p, dtype, device: samples, trainable parameters and their dtype/device.
        pairs, layers: the factor pairs and their layers; ``ghost[j]`` their chosen form.
        layout: the dense columns (materialised pairs and fallback parameters).
        block_size: samples per block.
        num_outputs: the model's output width (classes) on the probe.
    """

    def __init__(self, fn: str, model: nn.Module, inputs: Any, opts: Options, work: Work,
                 scale: bool = True) -> None:
        self.fn = fn
        if not isinstance(model, nn.Module):
            fail(fn, "model to be a torch.nn.Module", model, TypeError)
        self.model = model
        self.opts = opts
        self.loss = opts.loss
        self.scaled = scale
        self.params = trainable_parameters(model)
        if not self.params:
            fail(fn, "a model with trainable parameters", "none", raw=True)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        for p in self.params:
            if p.dtype not in FLOATS or p.dtype != self.dtype or p.device != self.device:
                fail(fn, "all trainable parameters float32 or float64 with one dtype and device "
                     f"({self.dtype}, {self.device})", f"{p.dtype} on {p.device}", TypeError,
                     raw=True)
        self._check_model()
        self.inputs = SampleInputs(fn, inputs, self.device, opts.forward)
        self.n = self.inputs.n
        self.given = given_targets(fn, opts, self.n, self.device)
        self.elem = self.params[0].element_size()
        self.offsets: list[int] = []
        off = 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.p = off
        self.layers, self.pairs = find_layers(model, self.params, self.offsets)
        self.recorder = Recorder(fn, self.layers)
        self._probe()
        work.n = self.n
        self.work = work
        direct_ok = [self.layers[q.layer].rule.has_direct for q in self.pairs]
        self.ghost = choose_forms(self.pairs, work, opts.strategy, direct_ok)
        for layer in self.layers:  # materialised layers with a direct rule skip the factors
            if layer.pairs and layer.rule.has_direct:
                layer.direct = not any(self.ghost[j] for j in layer.pairs)
        self.layout = self._layout(self.ghost)
        self.block_size = block_size(
            self.n, opts.memory_budget, self.elem, self.act_elems,
            sum(q.T * (q.d_in + q.d_out) for q in self.pairs
                if not self.layers[q.layer].direct),
            sum(self.params[i].numel() for i in self.fb), self.layout.width, opts.block_size)

    # ------------------------------------------------------------------------- set-up
    def _check_model(self) -> None:
        for name, m in self.model.named_modules():
            if _is_batch_coupled(m):
                fail(self.fn, "no batch-coupled layers (per-sample gradients are undefined when "
                     "samples share batch statistics; call model.eval())",
                     f"{type(m).__name__} '{name}' using batch statistics", raw=True)
        if self.opts.check_deterministic:
            check_model_is_deterministic(self.fn, self.model)

    def _call(self, part: Any) -> Any:
        return self.inputs.call(self.model, part)

    def _probe(self) -> None:
        """Run 1-2 samples: which layers run, their positions T, the outputs and labels."""
        m = min(self.n, 2)
        records, bad, out = self.recorder.forward(self._call, self.inputs.slice(0, m), m,
                                                  probe=True)
        self._check_output(out, m)
        self.num_outputs = out.shape[1] if out.dim() >= 2 else 1
        if self.given is not None:
            check_targets_against_outputs(self.fn, self.opts, self.given, out)
        else:
            predicted_targets(self.fn, self.loss, out)  # refuses outputs without classes
        bare = {id(layer.param): i for i, layer in enumerate(self.layers)
                if layer.param is not None and i not in bad and records[i]}
        if bare:  # every use of a bare parameter in the graph must be a recorded one
            uses = graph_uses(out, set(bare))
            bad |= {i for pid, i in bare.items() if uses[pid] != len(records[i])}
        keep = [i for i, layer in enumerate(self.layers) if i not in bad and records[i]]
        for i in keep:
            T = positions(self.layers[i], records[i])
            for j in self.layers[i].pairs:
                self.pairs[j].T = T
        new_layers: list[Layer] = []
        new_pairs: list[Pair] = []
        for i in keep:
            layer = self.layers[i]
            ids = []
            for j in layer.pairs:
                pair = self.pairs[j]
                pair.layer = len(new_layers)
                ids.append(len(new_pairs))
                new_pairs.append(pair)
            layer.pairs = ids
            new_layers.append(layer)
        self.layers, self.pairs = new_layers, new_pairs
        self.recorder.layers = new_layers
        self.act_elems = sum(r.elems() / m
                             for i in keep for r in records[i])
        self._set_fallback()

    def _set_fallback(self) -> None:
        covered = {i for layer in self.layers for i in layer.params}
        self.fb = [i for i in range(len(self.params)) if i not in covered]
        names = {id(p): nm for nm, p in self.model.named_parameters()}
        fb_names = [names[id(self.params[i])] for i in self.fb]
        if self.fb:
            for name, m in self.model.named_modules():
                is_dropout = isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout))
                if is_dropout and m.training and m.p > 0:
                    fail(self.fn, "no active dropout when some parameters need the torch.func "
                         f"fallback ({', '.join(fb_names[:3])}...): the fallback pass would draw "
                         "different masks (call model.eval())",
                         f"{type(m).__name__} '{name}' in training mode", raw=True)
        self.fallback = Fallback(self.model, fb_names, self.inputs, self.loss) if self.fb else None

    def _check_output(self, out: Any, nb: int) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != nb:
            fail(self.fn, "the model (or forward) to return outputs of shape (n, ...) (e.g. "
                 "logits (n, C); forward= extracts them from other outputs)",
                 f"{describe(out)} for {nb} inputs", raw=True)
        if out.dtype != self.dtype:
            fail(self.fn, f"model outputs of the parameters' dtype {self.dtype}", out.dtype,
                 TypeError, raw=True)

    def _layout(self, ghost: list[bool]) -> Layout:
        segs = []
        for layer in self.layers:
            if layer.direct:
                for i in layer.params:
                    segs.append(Segment(self.offsets[i], self.params[i].numel(), "p", i))
        for j, q in enumerate(self.pairs):
            if self.layers[q.layer].direct:
                continue
            if not ghost[j]:
                segs.append(Segment(q.w_offset, q.p_weight, "w", j))
                if q.has_bias:
                    segs.append(Segment(q.b_offset, q.d_out, "b", j))
        for j, i in enumerate(self.fb):
            segs.append(Segment(self.offsets[i], self.params[i].numel(), "f", j))
        return Layout(segs)

    # ------------------------------------------------------------------------- blocks
    def blocks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each sample block (a progress bar unless quiet)."""
        starts = range(0, self.n, self.block_size)
        it = tqdm(starts, desc=self.fn, unit="block", disable=self.opts.quiet or len(starts) < 2)
        for s in it:
            yield s, min(self.n, s + self.block_size)

    def capture(self, start: int, stop: int) -> Factors:
        """Factors of every pair and fallback gradients of samples ``[start, stop)``."""
        nb = stop - start
        part = self.inputs.slice(start, stop)
        if self.layers:
            records, _, out = self.recorder.forward(self._call, part, nb)
        else:
            records = []
            with torch.no_grad():
                out = self._call(part)
        self._check_output(out, nb)
        if self.given is None:
            y = predicted_targets(self.fn, self.loss, out)
        else:
            y = self.given[start:stop]
        A: list[torch.Tensor | None] = [None] * len(self.pairs)
        D: list[torch.Tensor | None] = [None] * len(self.pairs)
        direct: dict[int, torch.Tensor] = {}
        tensors = [t for recs in records for r in recs for t in r.targets]
        if tensors:
            total = self.loss.per_sample(out, y).sum()
            grads = iter(torch.autograd.grad(total, tensors, allow_unused=True))
            del total, out
            for i, layer in enumerate(self.layers):
                if not records[i]:
                    continue
                if layer.direct:
                    layer_direct(layer, records[i], grads, direct)
                else:
                    layer_factors(self.fn, layer, self.pairs, records[i], grads, nb, A, D)
            del records, tensors
        else:
            del out
        for layer in self.layers:
            if layer.direct:
                for i in layer.params:
                    if i not in direct:  # the layer did not run (or had no gradient)
                        direct[i] = torch.zeros(nb, self.params[i].numel(), dtype=self.dtype,
                                                device=self.device)
        for j, q in enumerate(self.pairs):
            if A[j] is None and not self.layers[q.layer].direct:  # the layer did not run
                A[j] = torch.zeros(nb, q.T, q.d_in, dtype=self.dtype, device=self.device)
                D[j] = torch.zeros(nb, q.T, q.d_out, dtype=self.dtype, device=self.device)
        fb = self.fallback(part, y) if self.fallback is not None else []
        dl = list(direct.values())
        scale = self._scale(nb, D, fb, dl) if self.scaled else torch.ones(
            nb, dtype=torch.float64, device=self.device)
        return Factors(nb, A, D, fb, scale, y, dict(zip(direct, dl)))

    def _scale(self, nb: int, D: list, fb: list, dl: list) -> torch.Tensor:
        """Scale each sample's D and fallback rows by a power of two; returns ``s`` (float64).

        ``s_i = 2^-e_i`` with ``peak_i = m 2^e_i``, ``m`` in [0.5, 1), so the scaled peaks lie in
        [0.5, 1); ``e_i`` is clipped to keep ``s_i`` a normal number of the dtype. Zero and
        non-finite peaks keep ``s_i = 1`` (zeros stay zero, NaN stays NaN)."""
        peak = None
        for t in [*D, *fb, *dl]:
            if t is not None and t.numel():
                r = t.reshape(nb, -1)
                m = torch.maximum(r.amax(1), r.amin(1).neg_())  # max |t| without an |t| copy
                peak = m if peak is None else torch.maximum(peak, m)
        ones = torch.ones(nb, dtype=torch.float64, device=self.device)
        if peak is None:
            return ones
        lo, hi = torch.aminmax(torch.where(peak > 0, peak, 1.0))  # zero rows need no scale
        if float(lo) >= 2.0**-_NO_SCALE and float(hi) <= 2.0**_NO_SCALE:
            return ones  # peaks near 1: unscaled products are safe (and bitwise as before)
        _, e = torch.frexp(peak)
        lim = 126 if self.dtype == torch.float32 else 1022  # s stays a normal number
        e = torch.where(torch.isfinite(peak) & (peak > 0), e.clamp(-lim, lim), 0)
        s = torch.ldexp(torch.ones(nb, dtype=self.dtype, device=self.device), -e)
        for lst in (D, fb, dl):
            for j, t in enumerate(lst):
                if t is not None:
                    lst[j] = t * s.view(nb, *([1] * (t.dim() - 1)))
        return torch.ldexp(torch.ones(nb, dtype=torch.float64, device=self.device),
                           -e.to(torch.int64))

    # ------------------------------------------------------------------------- dense columns
    def fill(self, f: Factors, buf: torch.Tensor, layout: Layout | None = None) -> None:
        """Write the per-sample gradient columns of ``layout`` (default: the engine's) into
        ``buf`` ``(nb, width)``."""
        layout = self.layout if layout is None else layout
        nb = f.n
        for s in layout.segments:
            cols = buf[:, s.col : s.col + s.size]
            if s.kind == "f":
                cols.copy_(f.fallback[s.index])
                continue
            if s.kind == "p":
                cols.copy_(f.direct[s.index])
                continue
            q = self.pairs[s.index]
            a, d = f.A[s.index], f.D[s.index]
            if s.kind == "b":
                cols.copy_(d[:, 0] if q.T == 1 else d.sum(1))
            elif q.T == 1:
                torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=cols.view(nb, q.d_out, q.d_in))
            else:
                torch.bmm(d.transpose(1, 2), a, out=cols.view(nb, q.d_out, q.d_in))

    def dense(self, f: Factors) -> torch.Tensor:
        """The block's dense columns ``(nb, layout.width)``."""
        buf = torch.empty(f.n, self.layout.width, dtype=self.dtype, device=self.device)
        if self.layout.width:
            self.fill(f, buf)
        return buf

    def ghost_index(self) -> list[int]:
        return [j for j, g in enumerate(self.ghost) if g]

    def ghost_factors(self, f: Factors) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """The ghost pairs' indices and factors for the kernels (``(n, d)`` when T = 1)."""
        idx = self.ghost_index()
        A = [f.A[j][:, 0] if self.pairs[j].T == 1 else f.A[j] for j in idx]
        D = [f.D[j][:, 0] if self.pairs[j].T == 1 else f.D[j] for j in idx]
        return idx, A, D

    def full_layout(self) -> Layout:
        """Every parameter as dense columns (``per_sample_grads``)."""
        return self._layout([False] * len(self.pairs))
