"""The per-sample gradient engine: factor capture, Gram, norms, alignment, covariance eigenpairs.

For a sample block, one forward pass (with forward hooks) and one backward pass (autograd of the
block's *summed* per-sample losses with respect to the layer outputs) give, for every
``nn.Linear`` and ``nn.Conv2d``, the factors of each sample's weight gradient:

* ``A`` (n, T, d_in): the layer inputs (Linear: any leading dimensions flattened into T; Conv2d:
  the unfolded patches, T = output positions);
* ``D`` (n, T, d_out): the gradients of the per-sample losses w.r.t. the layer outputs (summing
  the losses is what makes row i the gradient of sample i's own loss, as long as no layer couples
  samples).

Sample i's weight gradient is ``sum_t d_it a_it^T`` (row-major ``(d_out, d_in)``, the order of
``weight``), its bias gradient ``sum_t d_it``. A grouped convolution is one factor pair per group.
Per factor pair and per operation the engine picks the cheaper of the *ghost* form (the factored
kernels of :mod:`hbkernels.ops`, never forming the gradient) and *blocked materialisation* (the
pair's ``(n_block, p_l)`` gradient block, then dense GEMMs). Parameters of any other module (and of
Linear/Conv2d modules whose weights are shared or used outside their own ``forward``) fall back
to ``torch.func`` per-sample gradients (``vmap(grad(...))`` with ``functional_call``) for those
parameters only, so any ``nn.Module`` works.

Conventions:

* Parameter order: ``model.parameters()`` with ``requires_grad`` (:mod:`hbkernels.params`).
* Labels: ``"pred"`` (the model's own argmax: the paper's reinforcing gradient), ``"true"``
  (``targets=`` required) or an explicit integer tensor ``(n,)``.
* Per-sample loss: ``"ce"`` cross-entropy on logits, ``"nll"`` on log-probabilities, ``"mse"``
  against the one-hot of the label, **mean over the C classes** (``F.mse_loss(out_i, onehot_i)``
  with the default ``reduction="mean"`` on a single sample, as the paper's code does).
* The gradient of sample i is the gradient of its own loss: equal to a batch-of-one
  forward/backward.
* Models with batch-coupled layers (BatchNorm in training mode, or without running statistics)
  are refused with a ValueError; in eval mode they are fine. The model's mode is never changed,
  no hook stays attached and no ``.grad`` is written.
* Work happens in sample blocks whose working memory is estimated to fit ``memory_budget`` bytes
  (default 512 MiB; outputs such as the ``(n, n)`` Gram are not counted), so alignment and norms of
  10^5 inputs run in bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .params import trainable_parameters

__all__ = [
    "per_sample_grads",
    "gradient_norms",
    "gradient_gram",
    "gradient_alignment",
    "gradient_covariance_eigs",
    "DEFAULT_MEMORY_BUDGET",
]

Labels = Union[str, torch.Tensor]

DEFAULT_MEMORY_BUDGET = 512 * 2**20
"""Default working-memory budget per call, in bytes (outputs not included)."""

_LOSSES = ("ce", "nll", "mse")
_STRATEGIES = ("auto", "ghost", "materialise")
_FLOATS = (torch.float32, torch.float64)
# Elements of the (rows, T, d, k) temporaries of G^T U (the covariance eigenvectors).
_TEMP_ELEMS = 1 << 22


# ----------------------------------------------------------------------------- structures
@dataclass
class _Pair:
    """One factor pair: a Linear, a Conv2d, or one group of a grouped Conv2d."""

    layer: int  # index into _Engine.layers
    group: int
    d_in: int
    d_out: int
    w_offset: int  # start of the (d_out, d_in) row-major weight block in the flat order
    b_offset: int | None  # start of the (d_out,) bias block, None without a trainable bias
    T: int = 0  # positions (set by the probe)

    @property
    def p_weight(self) -> int:
        return self.d_in * self.d_out

    @property
    def has_bias(self) -> bool:
        return self.b_offset is not None


@dataclass
class _Layer:
    """A Linear or Conv2d whose parameters are handled through factors."""

    module: nn.Module
    name: str
    kind: str  # "linear" or "conv2d"
    pairs: list[int]
    params: list[int]  # indices into _Engine.params of its trainable parameters
    clone_in: bool = False  # the layer input is modified in place later: store a copy
    clone_out: bool = False  # the layer output is modified in place later: hand on a copy


@dataclass
class _Record:
    x: torch.Tensor
    x_version: int
    out: torch.Tensor
    out_version: int


@dataclass
class _Factors:
    """Everything one sample block contributes, before any product with vectors."""

    n: int
    A: list[torch.Tensor | None]  # per pair (n, T, d_in)
    D: list[torch.Tensor | None]  # per pair (n, T, d_out)
    fallback: list[torch.Tensor]  # per fallback parameter (n, numel)


@dataclass
class _Segment:
    p_start: int
    size: int
    kind: str  # "w", "b" (of a pair) or "f" (a fallback parameter)
    index: int
    col: int = 0


@dataclass
class _Layout:
    """Columns of a dense per-sample gradient block: segments of the flat parameter order."""

    segments: list[_Segment]
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


# ----------------------------------------------------------------------------- helpers
def _per_sample_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``(n,)`` losses of each sample on its own (batch-of-one semantics)."""
    if loss == "ce":
        return F.cross_entropy(out, y, reduction="none")
    if loss == "nll":
        return F.nll_loss(out, y, reduction="none")
    # one-hot without F.one_hot, whose range check is data-dependent (not vmap-able)
    onehot = (torch.arange(out.shape[1], device=out.device) == y.unsqueeze(1)).to(out.dtype)
    return F.mse_loss(out, onehot, reduction="none").mean(1)


def _is_batch_coupled(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.training or m.running_mean is None
    return False


def _check_int(fn: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: expected {name} to be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: expected {name} >= {minimum}, got {value}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return repr(x) if isinstance(x, str) else type(x).__name__


class _Engine:
    """Validated inputs, the layer plan and the per-block factor capture of one call."""

    def __init__(
        self,
        fn: str,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: Labels,
        loss: str,
        targets: torch.Tensor | None,
        block_size: int | None,
        memory_budget: int | None,
        quiet: bool,
        strategy: str = "auto",
    ) -> None:
        self.fn = fn
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be a torch.nn.Module, got {_describe(model)}")
        self.model = model
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError(f"{fn}: expected a model with trainable parameters, got none")
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        for p in self.params:
            if p.dtype not in _FLOATS or p.dtype != self.dtype or p.device != self.device:
                raise TypeError(
                    f"{fn}: expected all trainable parameters float32 or float64 with one dtype "
                    f"and device ({self.dtype}, {self.device}), got {p.dtype} on {p.device}"
                )
        for name, m in model.named_modules():
            if _is_batch_coupled(m):
                raise ValueError(
                    f"{fn}: expected no batch-coupled layers (per-sample gradients are undefined "
                    f"when samples share batch statistics; call model.eval()), got "
                    f"{type(m).__name__} '{name}' using batch statistics"
                )
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"{fn}: expected inputs to be a torch.Tensor, got {_describe(inputs)}")
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(
                f"{fn}: expected inputs of shape (n, ...) with n >= 1, got {tuple(inputs.shape)}"
            )
        if inputs.device != self.device:
            raise TypeError(
                f"{fn}: expected inputs on the model's device {self.device}, got {inputs.device}"
            )
        self.inputs = inputs
        self.n = n = inputs.shape[0]
        if loss not in _LOSSES:
            raise ValueError(f"{fn}: expected loss to be one of {_LOSSES}, got {_describe(loss)}")
        self.loss = loss
        self.given_labels = self._check_labels(labels, targets)
        if block_size is not None:
            _check_int(fn, "block_size", block_size, 1)
        if memory_budget is not None:
            _check_int(fn, "memory_budget", memory_budget, 1)
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"{fn}: expected strategy to be one of {_STRATEGIES}, got {_describe(strategy)}"
            )
        self.strategy = strategy
        self.budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        self.quiet = bool(quiet)
        self.elem = self.params[0].element_size()

        self.offsets: list[int] = []
        off = 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.p = off
        self._plan_layers()
        self._probe()
        self._user_block = block_size
        self.set_dense_width(0)

    # ------------------------------------------------------------------------- validation
    def _check_labels(self, labels: Labels, targets: torch.Tensor | None) -> torch.Tensor | None:
        fn, n = self.fn, self.n
        if isinstance(labels, str):
            if labels == "pred":
                return None
            if labels != "true":
                raise ValueError(
                    f"{fn}: expected labels to be 'pred', 'true' or a label tensor, got {labels!r}"
                )
            if targets is None:
                raise ValueError(
                    f"{fn}: expected targets (the true labels, shape ({n},)) with labels='true', "
                    "got None"
                )
            given, name = targets, "targets"
        elif isinstance(labels, torch.Tensor):
            given, name = labels, "labels"
        else:
            raise TypeError(
                f"{fn}: expected labels to be 'pred', 'true' or a label tensor, "
                f"got {_describe(labels)}"
            )
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"{fn}: expected {name} to be a torch.Tensor, got {_describe(given)}")
        if given.dtype.is_floating_point or given.dtype.is_complex or given.dtype == torch.bool:
            raise TypeError(f"{fn}: expected {name} to be an integer tensor, got {given.dtype}")
        if tuple(given.shape) != (n,):
            raise ValueError(f"{fn}: expected {name} of shape ({n},), got {tuple(given.shape)}")
        return given.to(device=self.device, dtype=torch.long)

    # ------------------------------------------------------------------------- planning
    def _plan_layers(self) -> None:
        """Find the Linear/Conv2d modules whose parameters can go through factors."""
        index = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[int, int] = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self.layers: list[_Layer] = []
        self.pairs: list[_Pair] = []
        for name, m in self.model.named_modules():
            if type(m) not in (nn.Linear, nn.Conv2d):
                continue
            w = m._parameters.get("weight")
            b = m._parameters.get("bias")
            if not isinstance(w, nn.Parameter) or id(w) not in index:
                continue  # frozen or parametrized weight: its bias (if any) falls back
            if owners[id(w)] != 1 or (b is not None and owners[id(b)] != 1):
                continue  # tied weights: the fallback sees every use
            has_bias = b is not None and id(b) in index
            li = len(self.layers)
            kind = "linear" if type(m) is nn.Linear else "conv2d"
            groups = 1 if kind == "linear" else m.groups
            d_out = w.shape[0] // groups
            d_in = w[0].numel()  # (C_in/groups) kh kw for a conv
            pair_ids = []
            for g in range(groups):
                pair_ids.append(len(self.pairs))
                self.pairs.append(
                    _Pair(
                        layer=li,
                        group=g,
                        d_in=d_in,
                        d_out=d_out,
                        w_offset=self.offsets[index[id(w)]] + g * d_out * d_in,
                        b_offset=self.offsets[index[id(b)]] + g * d_out if has_bias else None,
                    )
                )
            params = [index[id(w)]] + ([index[id(b)]] if has_bias else [])
            self.layers.append(_Layer(m, name, kind, pair_ids, params))

    def _set_fallback(self) -> None:
        covered = {i for layer in self.layers for i in layer.params}
        self.fb = [i for i in range(len(self.params)) if i not in covered]
        names = {id(p): nm for nm, p in self.model.named_parameters()}
        self.fb_names = [names[id(self.params[i])] for i in self.fb]
        if self.fb:
            for name, m in self.model.named_modules():
                is_dropout = isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout))
                if is_dropout and m.training and m.p > 0:
                    raise ValueError(
                        f"{self.fn}: expected no active dropout when some parameters need the "
                        f"torch.func fallback ({', '.join(self.fb_names[:3])}...): the fallback "
                        f"pass would draw different masks (call model.eval()), got "
                        f"{type(m).__name__} '{name}' in training mode"
                    )

    def _probe(self) -> None:
        """Run 1-2 samples: which layers fire, their positions T, in-place use of their tensors."""
        m = min(self.n, 2)
        xb = self.inputs[:m]
        for _ in range(len(self.layers) + 1):
            records, bad, out = self._forward(xb, m, probe=True)
            if not self._fix_inplace(records):
                break
        self._check_output(out, m)
        self.num_classes = out.shape[1]
        if self.given_labels is not None:
            lo, hi = int(self.given_labels.min()), int(self.given_labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"{self.fn}: expected labels in [0, {self.num_classes}), got values in "
                    f"[{lo}, {hi}]"
                )
        keep = []
        for i, layer in enumerate(self.layers):
            if i in bad or not records[i]:
                continue  # unsupported use (or never used): the fallback handles its params
            T = sum(self._positions(layer, r) for r in records[i])
            for j in layer.pairs:
                self.pairs[j].T = T
            keep.append(i)
        # Re-index the kept layers and their pairs.
        new_layers, new_pairs = [], []
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
        self._set_fallback()
        self.act_elems = sum(
            (r.x.numel() + r.out.numel()) / m for recs in records for r in recs
        )

    def set_dense_width(self, width: int) -> None:
        """Set the block size: the user's, or so that the estimated working set fits the budget.

        Per sample: the forward graph (about 4x the captured layer inputs and outputs), the
        factors (twice: capture and group slices), the fallback gradients (vmap temporaries) and
        ``width`` dense gradient columns.
        """
        if self._user_block is not None:
            self.block_size = min(self.n, self._user_block)
            return
        factors = sum(q.T * (q.d_in + q.d_out) for q in self.pairs)
        fb = sum(self.params[i].numel() for i in self.fb)
        per_sample = 4 * self.act_elems + 2 * factors + 4 * fb + width + 16
        self.block_size = min(self.n, max(1, int(self.budget // (per_sample * self.elem))))

    # ------------------------------------------------------------------------- capture
    @staticmethod
    def _positions(layer: _Layer, r: _Record) -> int:
        if layer.kind == "linear":
            return math.prod(r.x.shape[1:-1])
        return r.out.shape[2] * r.out.shape[3]

    def _forward(self, xb: torch.Tensor, nb: int, probe: bool = False):
        records: list[list[_Record]] = [[] for _ in self.layers]
        bad: set[int] = set()
        fn = self.fn

        def make_hook(i: int, layer: _Layer):
            def hook(module, args, output):
                x = args[0] if args else None
                ok = isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)
                if ok:
                    want4 = layer.kind == "conv2d"
                    ok = x.dim() >= 2 and x.shape[0] == nb and (x.dim() == 4 or not want4)
                if not ok:
                    if probe:
                        bad.add(i)
                        return None
                    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(
                        f"{fn}: expected the input of layer '{layer.name}' to have the sample "
                        f"dimension first ({nb}, ...), got {got}"
                    )
                if not output.requires_grad:
                    return None  # no graph through this call: it adds nothing to the gradient
                xin = x.detach()
                if layer.clone_in:
                    xin = xin.clone()
                records[i].append(_Record(xin, xin._version, output, output._version))
                return output.clone() if layer.clone_out else None

            return hook

        handles = [
            layer.module.register_forward_hook(make_hook(i, layer))
            for i, layer in enumerate(self.layers)
        ]
        try:
            with torch.enable_grad():
                out = self.model(xb)
        finally:
            for h in handles:
                h.remove()
        return records, bad, out

    def _fix_inplace(self, records: list[list[_Record]]) -> bool:
        """Mark layers whose captured tensors were modified in place; True if any was."""
        changed = False
        for i, recs in enumerate(records):
            layer = self.layers[i]
            for r in recs:
                if r.x._version != r.x_version and not layer.clone_in:
                    layer.clone_in = changed = True
                if r.out._version != r.out_version and not layer.clone_out:
                    layer.clone_out = changed = True
        return changed

    def _check_output(self, out, nb: int) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != nb:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self.fn}: expected the model to return outputs of shape (n, C) (logits, or "
                f"log-probabilities for loss='nll'), got {got} for {nb} inputs"
            )
        if out.dtype != self.dtype:
            raise TypeError(
                f"{self.fn}: expected model outputs of the parameters' dtype {self.dtype}, "
                f"got {out.dtype}"
            )

    def blocks(self, desc: str) -> Iterator[tuple[int, int]]:
        starts = range(0, self.n, self.block_size)
        it = tqdm(starts, desc=desc, unit="block", disable=self.quiet or len(starts) < 2)
        for s in it:
            yield s, min(self.n, s + self.block_size)

    def capture(self, start: int, stop: int) -> _Factors:
        """Factors of every pair and fallback per-sample gradients of samples [start, stop)."""
        nb = stop - start
        xb = self.inputs[start:stop]
        if self.layers:
            for _ in range(len(self.layers) + 1):
                records, _, out = self._forward(xb, nb)
                if not self._fix_inplace(records):
                    break
        else:
            records = []
            with torch.no_grad():
                out = self.model(xb)
        self._check_output(out, nb)
        if self.given_labels is None:
            y = out.detach().argmax(1)
        else:
            y = self.given_labels[start:stop]
        A: list[torch.Tensor | None] = [None] * len(self.pairs)
        D: list[torch.Tensor | None] = [None] * len(self.pairs)
        tensors = [r.out for recs in records for r in recs]
        if tensors:
            total = _per_sample_loss(out, y, self.loss).sum()
            grads = iter(torch.autograd.grad(total, tensors, allow_unused=True))
            del total, out
            for i, layer in enumerate(self.layers):
                self._layer_factors(layer, records[i], grads, nb, A, D)
        else:
            del out
        for i, layer in enumerate(self.layers):
            if not records or not records[i]:
                for j in layer.pairs:  # the layer did not run on this block
                    q = self.pairs[j]
                    A[j] = torch.zeros(nb, q.T, q.d_in, dtype=self.dtype, device=self.device)
                    D[j] = torch.zeros(nb, q.T, q.d_out, dtype=self.dtype, device=self.device)
        fallback = self._fallback(xb, y) if self.fb else []
        return _Factors(nb, A, D, fallback)

    def _layer_factors(self, layer, recs, grads, nb, A, D) -> None:
        if not recs:
            return
        a_parts, d_parts = [], []
        m = layer.module
        for r in recs:
            g = next(grads)
            if g is None:
                g = torch.zeros_like(r.out)
            if layer.kind == "linear":
                a_parts.append(r.x.reshape(nb, -1, r.x.shape[-1]))
                d_parts.append(g.reshape(nb, -1, g.shape[-1]))
            else:
                x, padding = r.x, m.padding
                if m.padding_mode != "zeros" or isinstance(padding, str):
                    if padding != "valid":
                        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
                    padding = 0
                cols = F.unfold(x, m.kernel_size, m.dilation, padding, m.stride)
                a_parts.append(cols.transpose(1, 2))
                d_parts.append(g.reshape(nb, g.shape[1], -1).transpose(1, 2))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 1)
        d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, 1)
        T = a.shape[1]
        for j in layer.pairs:
            q = self.pairs[j]
            if q.T != T:
                raise ValueError(
                    f"{self.fn}: expected layer '{layer.name}' to cover the same {q.T} positions "
                    f"for every sample block (data-dependent layer use is not supported), got {T}"
                )
            gi, go = q.group * q.d_in, q.group * q.d_out
            A[j] = a[..., gi : gi + q.d_in].contiguous()
            D[j] = d[..., go : go + q.d_out].contiguous()

    def _fallback(self, xb: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """torch.func per-sample gradients of the fallback parameters, flattened (nb, numel)."""
        from torch.func import functional_call, grad, vmap

        names = dict(self.model.named_parameters())
        fb = {nm: names[nm].detach() for nm in self.fb_names}
        rest = {nm: p.detach() for nm, p in names.items() if nm not in fb}
        model, loss = self.model, self.loss

        def sample_loss(theta, x, label):
            out = functional_call(model, {**rest, **theta}, (x.unsqueeze(0),))
            return _per_sample_loss(out, label.unsqueeze(0), loss).sum()

        g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(fb, xb, y)
        return [g[nm].reshape(xb.shape[0], -1) for nm in self.fb_names]

    # ------------------------------------------------------------------------- strategy
    def choose(self, op: str, k: int = 1) -> list[bool]:
        """Per pair: True for the ghost form, False for blocked materialisation."""
        if self.strategy != "auto":
            return [self.strategy == "ghost"] * len(self.pairs)
        out = []
        for q in self.pairs:
            T, pw, d = q.T, q.p_weight, q.d_in + q.d_out
            if op == "gram":  # per pair of samples (formation amortised over n partners)
                ghost, mat = T * T * d, pw + T * pw / self.n
            elif op == "norms":  # per sample
                ghost, mat = T * T * d, T * pw
            else:  # "align": per sample, k vectors (dots plus norms)
                ghost, mat = T * pw * k + T * T * d, T * pw + pw * k
                if T == 1:  # equal flops: ghost keeps a (narrow, k) temporary instead of p_l
                    ghost, mat = min(q.d_in, q.d_out) * k, pw
            out.append(ghost <= mat)
        return out

    def layout(self, ghost: list[bool]) -> _Layout:
        """Dense columns: the materialised pairs and the fallback parameters, in flat order."""
        segs = []
        for j, q in enumerate(self.pairs):
            if not ghost[j]:
                segs.append(_Segment(q.w_offset, q.p_weight, "w", j))
                if q.has_bias:
                    segs.append(_Segment(q.b_offset, q.d_out, "b", j))
        for j, i in enumerate(self.fb):
            segs.append(_Segment(self.offsets[i], self.params[i].numel(), "f", j))
        return _Layout(segs)

    def fill(self, f: _Factors, layout: _Layout, buf: torch.Tensor) -> None:
        """Write the per-sample gradient columns of ``layout`` into ``buf`` (nb, width)."""
        nb = f.n
        for s in layout.segments:
            cols = buf[:, s.col : s.col + s.size]
            if s.kind == "f":
                cols.copy_(f.fallback[s.index])
                continue
            q = self.pairs[s.index]
            a, d = f.A[s.index], f.D[s.index]
            if s.kind == "b":
                cols.copy_(d[:, 0] if q.T == 1 else d.sum(1))
            elif q.T == 1:
                torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=cols.view(nb, q.d_out, q.d_in))
            else:
                torch.bmm(d.transpose(1, 2), a, out=cols.view(nb, q.d_out, q.d_in))

    def ghost_factors(self, f: _Factors, ghost: list[bool]):
        """The ghost pairs' factors for the kernels ((n, d) when T = 1) and their indices."""
        idx = [j for j, g in enumerate(ghost) if g]
        A = [f.A[j][:, 0] if self.pairs[j].T == 1 else f.A[j] for j in idx]
        D = [f.D[j][:, 0] if self.pairs[j].T == 1 else f.D[j] for j in idx]
        return idx, A, D


# ----------------------------------------------------------------------------- public API
def per_sample_grads(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: Labels = "pred",
    loss: str = "ce",
    block_size: int | None = None,
    memory_budget: int | None = None,
    *,
    targets: torch.Tensor | None = None,
    quiet: bool = True,
) -> torch.Tensor:
    """The materialised per-sample gradient matrix ``G``, computed in sample blocks.

    Args:
        model: any ``nn.Module`` mapping ``inputs[i:j]`` to outputs ``(j - i, C)``.
        inputs: ``(n, ...)`` on the model's device.
        labels: ``"pred"`` (argmax of the model's outputs), ``"true"`` (``targets``) or an
            integer tensor ``(n,)``.
        loss: ``"ce"``, ``"nll"`` or ``"mse"`` (one-hot, mean over classes).
        block_size: samples per block (default: from ``memory_budget``).
        memory_budget: working-memory bytes per block (default 512 MiB; the output not counted).
        targets: ``(n,)`` true labels for ``labels="true"``.
        quiet: no progress bar.

    Returns:
        ``(n, p)`` in the model's dtype; row i is the gradient of sample i's own loss in
        ``model.parameters()`` order (trainable parameters only).
    """
    eng = _Engine("hbk.per_sample_grads", model, inputs, labels, loss, targets, block_size,
                  memory_budget, quiet)
    layout = eng.layout([False] * len(eng.pairs))
    out = torch.empty(eng.n, eng.p, dtype=eng.dtype, device=eng.device)
    for s, e in eng.blocks("hbk.per_sample_grads"):
        eng.fill(eng.capture(s, e), layout, out[s:e])
    return out


def gradient_norms(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: Labels = "pred",
    loss: str = "ce",
    block_size: int | None = None,
    memory_budget: int | None = None,
    *,
    targets: torch.Tensor | None = None,
    strategy: str = "auto",
    quiet: bool = True,
) -> torch.Tensor:
    """Euclidean norms ``|g_i|`` of the per-sample gradients, never forming ``G``.

    Args: as in :func:`per_sample_grads`; ``strategy`` is ``"auto"`` (per layer the cheaper of
        the ghost form and materialisation), ``"ghost"`` or ``"materialise"``.

    Returns:
        ``(n,)``.
    """
    eng = _Engine("hbk.gradient_norms", model, inputs, labels, loss, targets, block_size,
                  memory_budget, quiet, strategy)
    ghost = eng.choose("norms")
    layout = eng.layout(ghost)
    eng.set_dense_width(layout.width)
    out = torch.empty(eng.n, dtype=eng.dtype, device=eng.device)
    buf = torch.empty(eng.block_size, layout.width, dtype=eng.dtype, device=eng.device)
    for s, e in eng.blocks("hbk.gradient_norms"):
        out[s:e] = _sq_norms(eng, eng.capture(s, e), ghost, layout, buf[: e - s])
    return out.sqrt_()


def _sq_norms(eng: _Engine, f: _Factors, ghost, layout: _Layout, buf) -> torch.Tensor:
    idx, A, D = eng.ghost_factors(f, ghost)
    if idx:
        gsq = ops.ghost_sq_norms(A, D, [eng.pairs[j].has_bias for j in idx])
    else:
        gsq = torch.zeros(f.n, dtype=eng.dtype, device=eng.device)
    if layout.width:
        eng.fill(f, layout, buf)
        gsq += torch.linalg.vector_norm(buf, dim=1).square_()
    return gsq


def gradient_alignment(
    model: nn.Module,
    inputs: torch.Tensor,
    vectors: torch.Tensor,
    labels: Labels = "pred",
    loss: str = "ce",
    memory_budget: int | None = None,
    quiet: bool = True,
    *,
    targets: torch.Tensor | None = None,
    block_size: int | None = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """Cosine alignment ``C[i, j] = <g_i, v_j> / (|g_i| |v_j|)``, never forming ``G``.

    Per factor pair, the inner products come from the ghost kernels (``d_i^T V_l a_i``) or from
    the pair's materialised gradient block times the matching rows of ``V``, whichever is
    cheaper; other parameters use ``torch.func`` per-sample gradients. Partial dots and squared
    norms are summed over layers and combined by :func:`hbkernels.cosine_from_dots`.

    Args:
        model, inputs, labels, loss, targets, block_size, memory_budget, quiet: as in
            :func:`per_sample_grads`.
        vectors: ``(p, k)`` (or ``(p,)``) in ``model.parameters()`` order, the parameters'
            dtype and device.
        strategy: ``"auto"``, ``"ghost"`` or ``"materialise"`` (for every factor pair).

    Returns:
        ``(n, k)`` (``(n,)`` for 1-D ``vectors``). A zero gradient (or a zero vector) gives 0.
    """
    fn = "hbk.gradient_alignment"
    eng = _Engine(fn, model, inputs, labels, loss, targets, block_size, memory_budget, quiet,
                  strategy)
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"{fn}: expected vectors to be a torch.Tensor, got {_describe(vectors)}")
    if vectors.dtype != eng.dtype or vectors.device != eng.device:
        raise TypeError(
            f"{fn}: expected vectors with the parameters' dtype {eng.dtype} on {eng.device}, "
            f"got {vectors.dtype} on {vectors.device}"
        )
    squeeze = vectors.dim() == 1
    V = vectors.unsqueeze(1) if squeeze else vectors
    if V.dim() != 2 or V.shape[0] != eng.p or V.shape[1] < 1:
        raise ValueError(
            f"{fn}: expected vectors of shape ({eng.p}, k) or ({eng.p},), "
            f"got {tuple(vectors.shape)}"
        )
    V = V.contiguous()
    k = V.shape[1]
    ghost = eng.choose("align", k)
    layout = eng.layout(ghost)
    eng.set_dense_width(layout.width)
    vsq = _column_sq_norms(V)
    idx = [j for j, g in enumerate(ghost) if g]
    W = [V[q.w_offset : q.w_offset + q.p_weight].view(q.d_out, q.d_in, k)
         for q in (eng.pairs[j] for j in idx)]
    Wb = [V[q.b_offset : q.b_offset + q.d_out] if q.has_bias else None
          for q in (eng.pairs[j] for j in idx)]
    out = torch.empty(eng.n, k, dtype=eng.dtype, device=eng.device)
    buf = torch.empty(eng.block_size, layout.width, dtype=eng.dtype, device=eng.device)
    for s, e in eng.blocks(fn):
        f = eng.capture(s, e)
        _, A, D = eng.ghost_factors(f, ghost)
        if idx:
            dots = ops.ghost_dots(A, D, W, Wb)
            gsq = ops.ghost_sq_norms(A, D, [eng.pairs[j].has_bias for j in idx])
        else:
            dots = torch.zeros(f.n, k, dtype=eng.dtype, device=eng.device)
            gsq = torch.zeros(f.n, dtype=eng.dtype, device=eng.device)
        if layout.width:
            b = buf[: f.n]
            eng.fill(f, layout, b)
            gsq += torch.linalg.vector_norm(b, dim=1).square_()
            for col, p0, size in layout.runs:
                dots.addmm_(b[:, col : col + size], V[p0 : p0 + size])
        out[s:e] = ops.cosine_from_dots(dots, gsq, vsq)
    return out[:, 0] if squeeze else out


def _column_sq_norms(V: torch.Tensor) -> torch.Tensor:
    """``|v_j|^2`` of a row-major (p, k) matrix, in row chunks (a dim-0 reduction over the whole
    matrix is strided and several times slower for large k)."""
    rows = max(1, _TEMP_ELEMS // V.shape[1])
    vsq = V[:rows].square().sum(0)
    for r0 in range(rows, V.shape[0], rows):
        vsq += V[r0 : r0 + rows].square().sum(0)
    return vsq


def gradient_gram(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: Labels = "pred",
    loss: str = "ce",
    block_size: int | None = None,
    memory_budget: int | None = None,
    *,
    targets: torch.Tensor | None = None,
    strategy: str = "auto",
    quiet: bool = True,
) -> torch.Tensor:
    """Gram matrix ``K = G G^T`` of the per-sample gradients, never forming ``G``.

    Ghost pairs contribute ``(A A^T + b) * (D D^T)`` (and its T > 1 form) through
    :func:`hbkernels.ghost_gram`; materialised pairs and fallback parameters through
    :func:`hbkernels.gram` of their (compact) columns. When the compact per-sample factors of
    all n samples fit ``memory_budget`` they are kept and each kernel runs once; otherwise block
    pairs are recomputed (``b (b + 1) / 2`` block passes for ``b`` blocks).

    Args: as in :func:`gradient_norms`.

    Returns:
        ``(n, n)``, symmetric.
    """
    eng = _Engine("hbk.gradient_gram", model, inputs, labels, loss, targets, block_size,
                  memory_budget, quiet, strategy)
    return _gram(eng)[0]


@dataclass
class _Store:
    """Compact per-sample gradients of all n samples: ghost factors plus dense columns."""

    ghost: list[bool]
    layout: _Layout
    factors: _Factors  # A / D of the ghost pairs only
    dense: torch.Tensor  # (n, layout.width)


def _gram(eng: _Engine) -> tuple[torch.Tensor, _Store | None]:
    ghost = eng.choose("gram")
    layout = eng.layout(ghost)
    eng.set_dense_width(layout.width)
    n, dt, dev = eng.n, eng.dtype, eng.device
    compact = sum(q.T * (q.d_in + q.d_out) for j, q in enumerate(eng.pairs) if ghost[j])
    if n * (compact + layout.width) * eng.elem <= eng.budget:
        A = [torch.empty(n, q.T, q.d_in, dtype=dt, device=dev) if ghost[j] else None
             for j, q in enumerate(eng.pairs)]
        D = [torch.empty(n, q.T, q.d_out, dtype=dt, device=dev) if ghost[j] else None
             for j, q in enumerate(eng.pairs)]
        dense = torch.empty(n, layout.width, dtype=dt, device=dev)
        for s, e in eng.blocks(eng.fn):
            f = eng.capture(s, e)
            for j in range(len(eng.pairs)):
                if ghost[j]:
                    A[j][s:e] = f.A[j]
                    D[j][s:e] = f.D[j]
            if layout.width:
                eng.fill(f, layout, dense[s:e])
            del f
        store = _Store(ghost, layout, _Factors(n, A, D, []), dense)
        return _gram_of(eng, store.factors, ghost, dense), store
    # Recompute: block row I against block columns J >= I.
    K = torch.empty(n, n, dtype=dt, device=dev)
    spans = list(eng.blocks(eng.fn))
    for bi, (s, e) in enumerate(spans):
        fi = eng.capture(s, e)
        di = torch.empty(e - s, layout.width, dtype=dt, device=dev)
        eng.fill(fi, layout, di)
        K[s:e, s:e] = _gram_of(eng, fi, ghost, di)
        for s2, e2 in spans[bi + 1 :]:
            fj = eng.capture(s2, e2)
            dj = torch.empty(e2 - s2, layout.width, dtype=dt, device=dev)
            eng.fill(fj, layout, dj)
            Kij = _cross_gram(eng, fi, fj, ghost) + di @ dj.T
            K[s:e, s2:e2] = Kij
            K[s2:e2, s:e] = Kij.T
    return K, None


def _gram_of(eng: _Engine, f: _Factors, ghost: list[bool], dense: torch.Tensor) -> torch.Tensor:
    idx, A, D = eng.ghost_factors(f, ghost)
    K = ops.ghost_gram(A, D, [eng.pairs[j].has_bias for j in idx]) if idx else None
    if dense.shape[1]:
        Kd = ops.gram(dense)
        K = Kd if K is None else K.add_(Kd)
    if K is None:
        K = torch.zeros(f.n, f.n, dtype=eng.dtype, device=eng.device)
    return K


def _cross_gram(eng: _Engine, fi: _Factors, fj: _Factors, ghost: list[bool]) -> torch.Tensor:
    """``G_I G_J^T`` restricted to the ghost pairs, in tiles of bounded size."""
    ni, nj = fi.n, fj.n
    K = torch.zeros(ni, nj, dtype=eng.dtype, device=eng.device)
    for j, q in enumerate(eng.pairs):
        if not ghost[j]:
            continue
        T = q.T
        Ai, Di, Aj, Dj = fi.A[j], fi.D[j], fj.A[j], fj.D[j]
        if T == 1:
            aa = Ai[:, 0] @ Aj[:, 0].T
            if q.has_bias:
                aa += 1
            K.addcmul_(aa, Di[:, 0] @ Dj[:, 0].T)
            continue
        rows = max(1, _TEMP_ELEMS // (T * T * nj))
        Ai2, Di2 = Ai.reshape(ni * T, -1), Di.reshape(ni * T, -1)
        Aj2, Dj2 = Aj.reshape(nj * T, -1), Dj.reshape(nj * T, -1)
        for r0 in range(0, ni, rows):
            r1 = min(ni, r0 + rows)
            aa = Ai2[r0 * T : r1 * T] @ Aj2.T
            aa.mul_(Di2[r0 * T : r1 * T] @ Dj2.T)
            K[r0:r1] += aa.view(r1 - r0, T, nj, T).sum((1, 3))
        if q.has_bias:
            K.addmm_(Di.sum(1), Dj.sum(1).T)
    return K


def gradient_covariance_eigs(
    model: nn.Module,
    inputs: torch.Tensor,
    k: int,
    labels: Labels = "pred",
    loss: str = "ce",
    block_size: int | None = None,
    memory_budget: int | None = None,
    *,
    targets: torch.Tensor | None = None,
    strategy: str = "auto",
    quiet: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of the gradient covariance ``Sigma = G^T G / n``, never forming ``G``.

    ``Sigma`` and ``K / n = G G^T / n`` share their nonzero eigenvalues. With ``K u = n lambda u``
    (``|u| = 1``, a float64 ``eigh`` of the ``(n, n)`` Gram) the eigenvector is
    ``v = G^T u / sqrt(n lambda)``, and ``G^T u`` is assembled from the factors (per ghost pair
    ``sum_i u_i sum_t d_it a_it^T``) or from the materialised columns.

    Args:
        k: number of eigenpairs, ``1 <= k <= n``.
        Others: as in :func:`gradient_gram`.

    Returns:
        ``(eigenvalues (k,) descending, eigenvectors (p, k))`` in the model's dtype, columns of
        unit norm in ``model.parameters()`` order. Eigenvalues at or below
        ``n * eps * lambda_max`` (the rank of ``G`` is at most n) are returned as 0 with a zero
        column, since ``G`` does not determine those directions.
    """
    fn = "hbk.gradient_covariance_eigs"
    eng = _Engine(fn, model, inputs, labels, loss, targets, block_size, memory_budget, quiet,
                  strategy)
    _check_int(fn, "k", k, 1)
    if k > eng.n:
        raise ValueError(f"{fn}: expected k <= n = {eng.n}, got {k}")
    K, store = _gram(eng)
    evals, evecs = torch.linalg.eigh(K.double() / eng.n)
    evals, U = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
    tol = eng.n * torch.finfo(eng.dtype).eps * max(float(evals[0]), 0.0)
    keep = evals > tol
    scale = torch.where(keep, 1.0 / (eng.n * evals).clamp_min(1e-300).sqrt(), 0.0)
    U = (U * scale).to(eng.dtype)  # columns u / sqrt(n lambda); zero where dropped
    V = torch.zeros(eng.p, k, dtype=eng.dtype, device=eng.device)
    if store is not None:
        _add_gtu(eng, store.factors, store.ghost, store.layout, store.dense, U, V)
    else:
        ghost = eng.choose("gram")
        layout = eng.layout(ghost)
        for s, e in eng.blocks(fn):
            f = eng.capture(s, e)
            dense = torch.empty(f.n, layout.width, dtype=eng.dtype, device=eng.device)
            eng.fill(f, layout, dense)
            _add_gtu(eng, f, ghost, layout, dense, U[s:e], V)
    return torch.where(keep, evals, 0.0).to(eng.dtype), V


def _add_gtu(eng: _Engine, f: _Factors, ghost, layout: _Layout, dense, U, V) -> None:
    """``V += G^T U`` for one sample block (U: (nb, k))."""
    k = U.shape[1]
    for j, q in enumerate(eng.pairs):
        if not ghost[j]:
            continue
        a, d, T = f.A[j], f.D[j], q.T
        Vw = V[q.w_offset : q.w_offset + q.p_weight].view(q.d_out, q.d_in, k)
        rows = max(1, _TEMP_ELEMS // (T * q.d_out * k))
        for r0 in range(0, f.n, rows):
            r1 = min(f.n, r0 + rows)
            du = d[r0:r1, :, :, None] * U[r0:r1, None, None, :]  # (r, T, d_out, k)
            m = du.reshape(-1, q.d_out * k).T @ a[r0:r1].reshape(-1, q.d_in)  # (d_out k, d_in)
            Vw += m.view(q.d_out, k, q.d_in).transpose(1, 2)
        if q.has_bias:
            V[q.b_offset : q.b_offset + q.d_out] += d.sum(1).T @ U
    for col, p0, size in layout.runs:
        V[p0 : p0 + size].addmm_(dense[:, col : col + size].T, U)
