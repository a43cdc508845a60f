"""Factor capture: one rule per layer kind, and the hooked forward pass that records factors.

For a module whose sample i's weight gradient is ``sum_t d_it a_it^T`` (row-major
``(d_out, d_in)``, the order of ``weight``) and bias gradient ``sum_t d_it``, a rule turns the
recorded layer input ``x`` and the gradient ``g`` of the summed per-sample losses w.r.t. the
layer output into the factors

* ``A`` (n, T, d_in): Linear: the input, any middle dimensions flattened into T; Conv1d/Conv2d:
  the unfolded patches, T = output positions;
* ``D`` (n, T, d_out): the output gradients at the same positions.

A grouped convolution is one factor pair per group. ``nn.Embedding`` is a pair too, with the
roles swapped: ``A`` the output gradients (n, T, dim) and ``D`` the one-hot token ids
(n, T, vocab) (the weight ``(vocab, dim)`` is ``sum_t onehot_t d_t^T``), so the ghost Gram is a
token-equality Gram.

A rule may also give the *direct* per-sample gradients of its module's parameters from the
recorded input and output gradient (:meth:`LayerRule.direct`), without factors:

* Conv1d/Conv2d: the per-sample weight gradients as one grouped convolution backward over the
  block (the samples as groups: MKL-DNN's weight-gradient kernel, 5-17x faster here than
  ``unfold`` + ``bmm``), used when the planner materialises the layer;
* BatchNorm in eval mode, LayerNorm, GroupNorm (elementwise affine): ``sum_t d_t * xhat_t`` and
  ``sum_t d_t`` per channel / normalised element (direct only, no factors).

``nn.MultiheadAttention`` (self-attention) is two factor pairs over the tokens (in- and
out-projection, :class:`AttentionRule`): capture replaces its forward by the same computation
with explicit ops, so that the projections' inputs and output gradients exist. A trainable
parameter outside every rule used as ``x + p``, ``x - p`` or ``x * p`` (a learned positional
embedding, a scale) is a direct layer of its own (:class:`BareRule`), its uses recorded by a
torch-function mode and checked against the autograd graph.

To add a layer kind, write a :class:`LayerRule` and add it to :data:`RULES`; parameters no rule
covers go to the torch.func fallback.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..checks import fail

__all__ = [
    "RULES",
    "AttentionRule",
    "BareRule",
    "ConvRule",
    "EmbeddingRule",
    "Layer",
    "LayerRule",
    "LinearRule",
    "NormRule",
    "Pair",
    "ParamUses",
    "Recorder",
    "attention_forward",
    "find_layers",
    "graph_uses",
    "layer_direct",
    "layer_factors",
    "positions",
]


# ----------------------------------------------------------------------------- rules
class LayerRule:
    """How one layer kind yields factors (or direct per-sample gradients).

    Subclasses set ``input_dims`` and implement :meth:`factors` (``has_factors``) and/or
    :meth:`direct` (``has_direct``); ``groups`` splits the factors into pairs along their last
    dimension; ``supports`` refuses module configurations the rule does not cover (they go to
    the fallback)."""

    input_dims: tuple[int, ...] | None = None  # accepted input ranks (None: any >= 2)
    has_factors: bool = True
    has_direct: bool = False
    wraps_forward: bool = False  # capture replaces the module's forward (see AttentionRule)

    def groups(self, module: nn.Module) -> int:
        return 1

    def supports(self, module: nn.Module) -> bool:
        return True

    def accepts(self, x: Any, nb: int) -> bool:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != nb:
            return False
        return self.input_dims is None or x.dim() in self.input_dims

    def positions(self, x: torch.Tensor, out: torch.Tensor) -> int:
        """Positions T of one call (input ``x``, output ``out``)."""
        return math.prod(x.shape[1:-1])

    def factors(self, module: nn.Module, x: torch.Tensor,
                g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``(A (n, T, d_in * groups), D (n, T, d_out * groups))`` from the layer input ``x``
        and the output gradient ``g``."""
        raise NotImplementedError

    def direct(self, module: nn.Module, x: torch.Tensor,
               g: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        """Per-sample gradients ``[(n, weight.numel()), (n, bias.numel())]`` (bias only when
        the module has one) from the input ``x`` and the output gradient ``g``."""
        raise NotImplementedError


class LinearRule(LayerRule):
    """``nn.Linear`` on ``(n, ..., d_in)``: T = the product of the middle dimensions."""

    def factors(self, module, x, g):
        n = x.shape[0]
        return x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])


def _conv_input(module: nn.Module, x: torch.Tensor, spatial: int):
    """The input padded as the module pads it, and the convolution padding left to apply."""
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        if padding != "valid":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * spatial
    return x, tuple(padding)


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride, dilation, groups, padding and padding mode)
    through ``F.unfold`` (a Conv1d runs as a height-1 Conv2d), or directly (:meth:`direct`)."""

    has_direct = True

    def __init__(self, spatial: int) -> None:
        self.spatial = spatial
        self.input_dims = (spatial + 2,)

    def groups(self, module):
        return module.groups

    def positions(self, x, out):
        return math.prod(out.shape[2:])

    def factors(self, module, x, g):
        n = x.shape[0]
        x, padding = _conv_input(module, x, self.spatial)
        ks, dil, st = module.kernel_size, module.dilation, module.stride
        if self.spatial == 1:
            x = x.unsqueeze(2)
            ks, dil, st, padding = (1, *ks), (1, *dil), (1, *st), (0, *padding)
        cols = F.unfold(x, ks, dil, padding, st)  # (n, C k..., T)
        return cols.transpose(1, 2), g.reshape(n, g.shape[1], -1).transpose(1, 2)

    def direct(self, module, x, g):
        """The weight gradient of the block as one convolution with the samples as groups:
        input ``(1, n C, ...)``, output gradient ``(1, n O, ...)``, ``groups = n * groups``."""
        n = x.shape[0]
        x, padding = _conv_input(module, x, self.spatial)
        w = module.weight
        shape = (n * w.shape[0], *w.shape[1:])
        # Only the weight's shape is read for the weight gradient: a stride-0 view, no copy.
        wv = torch.zeros(1, dtype=w.dtype, device=w.device).as_strided(shape, (0,) * len(shape))
        gw = torch.ops.aten.convolution_backward(
            g.reshape(1, n * g.shape[1], *g.shape[2:]), x.reshape(1, n * x.shape[1], *x.shape[2:]),
            wv, None, list(module.stride), list(padding), list(module.dilation), False,
            [0] * self.spatial, n * module.groups, [False, True, False])[1]
        out = [gw.reshape(n, -1)]
        if module.bias is not None:
            out.append(g.reshape(n, g.shape[1], -1).sum(2))
        return out


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` on integer ids ``(n, ...)``: ``A`` = the output gradients
    ``(n, T, dim)``, ``D`` = the one-hot ids ``(n, T, vocab)`` (zero rows at ``padding_idx``,
    which gets no gradient). Not for ``max_norm`` (the forward renormalises the weight in
    place) or ``scale_grad_by_freq`` (a batch-dependent gradient): those fall back."""

    def supports(self, module):
        return module.max_norm is None and not module.scale_grad_by_freq

    def accepts(self, x, nb):
        return (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == nb
                and not x.is_floating_point() and not x.is_complex())

    def positions(self, x, out):
        return math.prod(x.shape[1:])

    def factors(self, module, x, g):
        n = x.shape[0]
        ids = x.reshape(n, -1)
        D = F.one_hot(ids, module.num_embeddings).to(g.dtype)
        if module.padding_idx is not None:
            D[..., module.padding_idx] = 0
        return g.reshape(n, -1, g.shape[-1]), D


class NormRule(LayerRule):
    """Elementwise-affine normalisation ``y = xhat * w + b``: BatchNorm in eval mode (running
    statistics), LayerNorm, GroupNorm. Direct only: ``g_w = sum_t d_t * xhat_t``,
    ``g_b = sum_t d_t`` over the positions that share a weight entry."""

    has_factors = False
    has_direct = True

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def supports(self, module):
        if self.kind == "batch":
            return (not module.training and module.running_mean is not None
                    and module.running_var is not None)
        return True

    def _xhat(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if self.kind == "group":
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)

    def direct(self, module, x, g):
        n = x.shape[0]
        xhat = self._xhat(module, x)
        if self.kind == "layer":
            k = len(module.normalized_shape)
            dims = tuple(range(1, x.dim() - k))
        else:
            dims = tuple(range(2, x.dim()))
        out = []
        if module.weight is not None:
            gw = g * xhat
            out.append((gw.sum(dims) if dims else gw).reshape(n, -1))
        if module.bias is not None:
            out.append((g.sum(dims) if dims else g).reshape(n, -1))
        return out


class AttentionRule(LayerRule):
    """``nn.MultiheadAttention`` self-attention (``query is key is value``, packed
    ``in_proj_weight``, no ``bias_k``/``bias_v``/``add_zero_attn``, no active dropout), either
    ``batch_first``, with or without biases, any ``need_weights``, ``attn_mask`` /
    ``key_padding_mask``. Its weights are used inside ``F.multi_head_attention_forward`` (no
    module of theirs runs), so during capture :func:`attention_forward` replaces the module's
    forward by the same computation with explicit ops and records two factor pairs over the
    ``T`` tokens:

    * ``in_proj_weight`` ``(3E, E)``: ``A`` = the input ``x`` ``(n, T, E)``, ``D`` = the
      gradients of the packed projections ``[q, k, v]`` ``(n, T, 3E)``;
    * ``out_proj.weight`` ``(E, E)``: ``A`` = the attention context ``(n, T, E)``, ``D`` = the
      gradient of the output.

    Other uses (cross-attention, unbatched inputs) are marked unsupported by the probe and go
    to the fallback."""

    wraps_forward = True

    def supports(self, module):
        m = module
        return (m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None
                and m.bias_v is None and not m.add_zero_attn
                and not (m.training and m.dropout > 0))

    def param_pairs(self, module) -> list[tuple[Any, Any]]:
        """``(weight, bias)`` of each factor pair, in pair order."""
        return [(module.in_proj_weight, module.in_proj_bias),
                (module.out_proj.weight, module.out_proj.bias)]

    def positions(self, x, out):
        return x[0].shape[1]

    def pair_factors(self, module, x, g) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A, D)]`` of the two pairs from the recorded ``(input, context)`` and the
        gradients of ``(qkv, output)`` (``None``: zero)."""
        xin, ctx = x
        gqkv, go = g
        if gqkv is None:
            gqkv = xin.new_zeros(*xin.shape[:2], 3 * xin.shape[2])
        if go is None:
            go = torch.zeros_like(ctx)
        return [(xin, gqkv), (ctx, go)]


def attention_forward(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                      need_weights=True, attn_mask=None, average_attn_weights=True,
                      is_causal=False):
    """``m(query, key, value, ...)`` for self-attention by explicit ops (the math form of
    ``F.multi_head_attention_forward``, equal to it up to round-off).

    Returns ``(output, weights or None), (x (n, T, E), qkv (n, T, 3E), context (n, T, E))``
    with the batch first in ``x``, ``qkv`` and ``context``."""
    x = query if m.batch_first else query.transpose(0, 1)
    n, T, E = x.shape
    H = m.num_heads
    hd = E // H
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=x.dtype)
    am = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                           other_name="", target_type=x.dtype, check_other=False)
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = (t.reshape(n, T, H, hd).transpose(1, 2) for t in qkv.split(E, -1))
    scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))  # (n, H, T, T)
    if am is not None:
        scores = scores + (am.view(n, H, T, T) if am.dim() == 3 else am)
    if kpm is not None:
        scores = scores + kpm.view(n, 1, 1, T)
    w = torch.softmax(scores, -1)
    ctx = torch.matmul(w, v).transpose(1, 2).reshape(n, T, E)
    o = F.linear(ctx, m.out_proj.weight, m.out_proj.bias)
    weights = None
    if need_weights:
        weights = w.mean(1) if average_attn_weights else w
    return (o if m.batch_first else o.transpose(0, 1)), weights, (x, qkv, ctx, o)


def attention_accepts(m: nn.MultiheadAttention, nb: int, query, key, value, kwargs) -> bool:
    """Whether :func:`attention_forward` covers this call (self-attention of ``nb`` samples)."""
    if not (isinstance(query, torch.Tensor) and query is key and key is value
            and query.dim() == 3):
        return False
    if kwargs.get("is_causal") and kwargs.get("attn_mask") is None:
        return False  # the module raises: let it
    return query.shape[0 if m.batch_first else 1] == nb and query.shape[2] == m.embed_dim


class BareRule(LayerRule):
    """A trainable parameter ``p`` used outside any rule, through ``x + p``, ``x - p``,
    ``p - x`` or ``x * p`` (``p`` broadcast over the sample dimension: e.g. a learned
    positional embedding added to the token embeddings, a learned scale). Each use is recorded
    during capture by a :class:`ParamUses` torch-function mode; the per-sample gradient is
    ``sum`` over the broadcast positions of the result's gradient (times ``x`` for ``mul``).
    The probe checks through autograd that the recorded uses are *all* of ``p``'s uses in the
    graph; otherwise ``p`` goes to the fallback."""

    has_factors = False
    has_direct = True

    def accepts(self, x, nb):
        return True

    def positions(self, x, out):
        return 0

    def direct(self, module, x, g):
        kind, other, shape = x
        nb = g.shape[0]
        if kind == "mul":
            g = g * other
        elif kind == "neg":
            g = -g
        return [g.sum_to_size((nb, *shape)).reshape(nb, -1)]


def _bare_shape(p: torch.Tensor, res: torch.Tensor, nb: int) -> tuple[int, ...] | None:
    """``p``'s shape right-aligned to ``res.shape[1:]`` (None if ``p`` spans the samples)."""
    k = res.dim() - 1
    if res.dim() < 1 or res.shape[0] != nb:
        return None
    shape = tuple(p.shape)
    if len(shape) == k + 1:
        if shape[0] != 1:
            return None
        shape = shape[1:]
    if len(shape) > k:
        return None
    return (1,) * (k - len(shape)) + shape


_BARE_OPS = {torch.Tensor.add: "add", torch.add: "add", torch.Tensor.sub: "sub",
             torch.sub: "sub", torch.Tensor.mul: "mul", torch.mul: "mul",
             torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
             torch.Tensor.__sub__: "sub", torch.Tensor.__mul__: "mul",
             torch.Tensor.__rmul__: "mul"}


class ParamUses(TorchFunctionMode):
    """Records the supported uses (:class:`BareRule`) of tracked parameters during a forward.

    Args:
        tracked: ``id(parameter) -> (layer index, parameter)``.
        nb: samples in the block.
        on_use: ``on_use(i, kind, other, shape, result) -> tensor to return``.
        on_bad: ``on_bad(i, what)`` for an unsupported use.
    """

    def __init__(self, tracked: dict[int, tuple[int, torch.Tensor]], nb: int, on_use,
                 on_bad) -> None:
        super().__init__()
        self.tracked, self.nb, self.on_use, self.on_bad = tracked, nb, on_use, on_bad

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hits = [a for a in (*args, *kwargs.values())
                if isinstance(a, torch.Tensor) and id(a) in self.tracked]
        res = func(*args, **kwargs)
        if not hits or not isinstance(res, torch.Tensor) or not res.requires_grad:
            return res
        kind = _BARE_OPS.get(func)
        i, p = self.tracked[id(hits[0])]
        if kind is None or len(hits) != 1 or kwargs or len(args) != 2:
            self.on_bad(i, getattr(func, "__name__", str(func)))
            return res
        other = args[1] if args[0] is p else args[0]
        shape = _bare_shape(p, res, self.nb) if isinstance(other, torch.Tensor) else None
        if shape is None:
            self.on_bad(i, f"{kind} with {tuple(res.shape)} outputs")
            return res
        if kind == "sub" and args[1] is p:
            kind = "neg"
        return self.on_use(i, kind, other, shape, res)


def graph_uses(out: torch.Tensor, ids: set[int]) -> dict[int, int]:
    """Edges into each leaf ``id`` in ``ids`` in the autograd graph of ``out``."""
    counts = dict.fromkeys(ids, 0)
    fn = out.grad_fn
    if fn is None:
        return counts
    seen, stack = {id(fn)}, [fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in counts:
                counts[id(var)] += 1
            if id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return counts


RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Embedding: EmbeddingRule(),
    nn.BatchNorm1d: NormRule("batch"),
    nn.BatchNorm2d: NormRule("batch"),
    nn.BatchNorm3d: NormRule("batch"),
    nn.LayerNorm: NormRule("layer"),
    nn.GroupNorm: NormRule("group"),
    nn.MultiheadAttention: AttentionRule(),
}
"""Exact module types with a factor rule (subclasses are not matched: their forward may differ)."""

BARE = BareRule()
"""The rule of trainable parameters outside any rule's module (probed per parameter)."""


# ----------------------------------------------------------------------------- structures
@dataclass
class Pair:
    """One factor pair: a layer, or one group of a grouped convolution."""

    layer: int
    group: int
    d_in: int
    d_out: int
    w_offset: int  # start of the (d_out, d_in) row-major weight block in the flat order
    b_offset: int | None  # start of the (d_out,) bias block; None without a trainable bias
    T: int = 0  # positions (set by the probe)

    @property
    def p_weight(self) -> int:
        return self.d_in * self.d_out

    @property
    def has_bias(self) -> bool:
        return self.b_offset is not None


@dataclass
class Layer:
    """A module whose parameters go through factors or its rule's direct gradients."""

    module: nn.Module
    name: str
    rule: LayerRule
    pairs: list[int]
    params: list[int]  # indices into the trainable parameters
    direct: bool = False  # per-sample gradients by rule.direct (no factors)
    bias_dropped: bool = False  # rule.direct returns a gradient of a frozen bias: drop it
    clone_in: bool = False  # the input is modified in place later: record a copy
    clone_out: bool = False  # the output is modified in place later: hand on a copy
    param: torch.Tensor | None = None  # a BareRule layer's parameter (module is None)


@dataclass
class Record:
    """One call of a layer: its input(s) ``x`` (the rule's form), the output ``out`` handed on,
    their versions at record time, and ``targets``: the tensors whose gradients the rule needs
    (default ``(out,)``); ``x_ref`` is the tensor ``x_version`` belongs to (default ``x``)."""

    x: Any
    x_version: int
    out: torch.Tensor
    out_version: int
    targets: tuple = ()
    x_ref: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = (self.out,)
        if self.x_ref is None and isinstance(self.x, torch.Tensor):
            self.x_ref = self.x

    def elems(self) -> int:
        """Elements of the recorded tensors (for the memory estimate)."""
        return (self.x_ref.numel() if self.x_ref is not None else 0) + sum(
            t.numel() for t in self.targets)


def find_layers(model: nn.Module, params: list[torch.Tensor],
                offsets: list[int]) -> tuple[list[Layer], list[Pair]]:
    """The modules with a rule whose trainable weight is used by that module only."""
    index = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    layers: list[Layer] = []
    pairs: list[Pair] = []
    for name, m in model.named_modules():
        rule = RULES.get(type(m))
        if rule is None or not rule.supports(m):
            continue
        w, b = m._parameters.get("weight"), m._parameters.get("bias")
        if not rule.has_factors:  # direct only: every present parameter trainable, used once
            present = [q for q in (w, b) if q is not None]
            if not present or any(not isinstance(q, nn.Parameter) or id(q) not in index
                                  or owners[id(q)] != 1 for q in present):
                continue
            layers.append(Layer(m, name, rule, [], [index[id(q)] for q in present],
                                direct=True))
            continue
        if hasattr(rule, "param_pairs"):
            _add_multi(m, name, rule, index, offsets, owners, layers, pairs)
            continue
        if not isinstance(w, nn.Parameter) or id(w) not in index:
            continue  # frozen or parametrized weight: its bias (if any) falls back
        if owners[id(w)] != 1 or (b is not None and owners[id(b)] != 1):
            continue  # tied weights: the fallback sees every use
        has_bias = b is not None and id(b) in index
        groups = rule.groups(m)
        d_out, d_in = w.shape[0] // groups, w[0].numel()
        ids = []
        for g in range(groups):
            ids.append(len(pairs))
            pairs.append(Pair(len(layers), g, d_in, d_out,
                              offsets[index[id(w)]] + g * d_out * d_in,
                              offsets[index[id(b)]] + g * d_out if has_bias else None))
        layers.append(Layer(m, name, rule, ids, [index[id(w)]] + ([index[id(b)]] if has_bias else []),
                            bias_dropped=b is not None and not has_bias))
    covered = {i for layer in layers for i in layer.params}
    names = {id(p): nm for nm, p in model.named_parameters()}
    for i, p in enumerate(params):  # the rest: candidates for BareRule (checked by the probe)
        if i not in covered and id(p) in names:
            layers.append(Layer(None, names[id(p)], BARE, [], [i], direct=True, param=p))
    return layers, pairs


def _add_multi(m, name, rule, index, offsets, owners, layers, pairs) -> None:
    """A layer with several (weight, bias) factor pairs (``rule.param_pairs``): all weights
    trainable, every parameter used by this module only; frozen biases are left out."""
    wb = rule.param_pairs(m)
    present = [q for w, b in wb for q in (w, b) if q is not None]
    if any(owners.get(id(q), 0) != 1 for q in present) or any(
            not isinstance(w, nn.Parameter) or id(w) not in index for w, _ in wb):
        return
    ids, params = [], []
    for w, b in wb:
        has_bias = b is not None and id(b) in index
        ids.append(len(pairs))
        pairs.append(Pair(len(layers), 0, w.shape[1], w.shape[0], offsets[index[id(w)]],
                          offsets[index[id(b)]] if has_bias else None))
        params += [index[id(w)]] + ([index[id(b)]] if has_bias else [])
    layers.append(Layer(m, name, rule, ids, params))


# ----------------------------------------------------------------------------- recording
class Recorder:
    """Forward passes with hooks that record each layer's input and output.

    Args:
        fn: the public function, for error messages.
        layers: the layers to record.
    """

    def __init__(self, fn: str, layers: list[Layer]) -> None:
        self.fn = fn
        self.layers = layers

    def forward(self, call, part: Any, nb: int, probe: bool = False):
        """``(records per layer, layers used unsupportedly, outputs)`` of one forward pass.

        Repeated until no recorded tensor was modified in place afterwards (such layers then
        record copies)."""
        for _ in range(len(self.layers) + 1):
            records, bad, out = self._once(call, part, nb, probe)
            if not self._fix_inplace(records):
                return records, bad, out
        return records, bad, out  # pragma: no cover - each round fixes at least one layer

    def _once(self, call, part, nb, probe):
        records: list[list[Record]] = [[] for _ in self.layers]
        bad: set[int] = set()
        fn = self.fn

        def make_hook(i: int, layer: Layer):
            def hook(module, args, output):
                x = args[0] if args else None
                if not (layer.rule.accepts(x, nb) and isinstance(output, torch.Tensor)):
                    if probe:
                        bad.add(i)
                        return None
                    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    fail(fn, f"the input of layer '{layer.name}' to have the sample dimension "
                         f"first ({nb}, ...)", got, raw=True)
                if not output.requires_grad:
                    return None  # no graph through this call: it adds nothing to the gradient
                xin = x.detach()
                if layer.clone_in:
                    xin = xin.clone()
                records[i].append(Record(xin, xin._version, output, output._version))
                return output.clone() if layer.clone_out else None

            return hook

        def make_forward(i: int, layer: Layer):
            m = layer.module
            orig = type(m).forward

            def forward(query, key, value, *args, **kwargs):
                kwargs.update(zip(_ATTN_ARGS, args))
                if not attention_accepts(m, nb, query, key, value, kwargs):
                    if probe:
                        bad.add(i)
                        return orig(m, query, key, value, **kwargs)
                    got = tuple(query.shape) if isinstance(query, torch.Tensor) else type(
                        query).__name__
                    fail(fn, f"attention layer '{layer.name}' to be self-attention (query is key "
                         f"is value) of {nb} samples", got, raw=True)
                out, weights, (x, qkv, ctx, o) = attention_forward(m, query, key, value,
                                                                   **kwargs)
                if not o.requires_grad:
                    return out, weights
                xin = x.detach()
                if layer.clone_in:
                    xin = xin.clone()
                records[i].append(Record((xin, ctx.detach()), query._version, o, o._version,
                                         (qkv, o), query))
                return (out.clone() if layer.clone_out else out), weights

            return forward

        def on_use(i, kind, other, shape, res):
            layer = self.layers[i]
            ox = None
            if kind == "mul":
                ox = other.detach()
                if layer.clone_in:
                    ox = ox.clone()
            records[i].append(Record((kind, ox, shape), ox._version if ox is not None else 0,
                                     res, res._version, x_ref=ox))
            return res.clone() if layer.clone_out else res

        def on_bad(i, what):
            if probe:
                bad.add(i)
                return
            fail(fn, f"parameter '{self.layers[i].name}' to be used as x + p, x - p or x * p "
                 "(as in the probe)", what, raw=True)

        handles, patched, tracked = [], [], {}
        for i, layer in enumerate(self.layers):
            if layer.param is not None:
                tracked[id(layer.param)] = (i, layer.param)
            elif layer.rule.wraps_forward:
                m = layer.module
                patched.append((m, m.__dict__.get("forward", _MISSING)))
                m.__dict__["forward"] = make_forward(i, layer)
            else:
                handles.append(layer.module.register_forward_hook(make_hook(i, layer)))
        mode = ParamUses(tracked, nb, on_use, on_bad) if tracked else contextlib.nullcontext()
        try:
            with torch.enable_grad(), mode:
                out = call(part)
        finally:
            for h in handles:
                h.remove()
            for m, prev in patched:
                if prev is _MISSING:
                    del m.__dict__["forward"]
                else:
                    m.__dict__["forward"] = prev
        return records, bad, out

    def _fix_inplace(self, records: list[list[Record]]) -> bool:
        changed = False
        for layer, recs in zip(self.layers, records):
            for r in recs:
                if (r.x_ref is not None and r.x_ref._version != r.x_version
                        and not layer.clone_in):
                    layer.clone_in = changed = True
                if r.out._version != r.out_version and not layer.clone_out:
                    layer.clone_out = changed = True
        return changed


_MISSING = object()
_ATTN_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
              "is_causal")


def positions(layer: Layer, recs: list[Record]) -> int:
    """T of a layer over all its calls in one forward pass."""
    return sum(layer.rule.positions(r.x, r.out) for r in recs)


def layer_direct(layer: Layer, recs: list[Record], grads, out: dict[int, torch.Tensor]) -> None:
    """Write the direct per-sample gradients ``(nb, numel)`` of ``layer``'s parameters into
    ``out`` (keyed by parameter index; summed over the layer's calls)."""
    for r in recs:
        g = next(grads)
        if g is None:
            continue
        parts = layer.rule.direct(layer.module, r.x, g)
        if layer.bias_dropped:
            parts = parts[:1]
        for i, t in zip(layer.params, parts):
            out[i] = t if i not in out else out[i] + t


def layer_factors(fn: str, layer: Layer, pairs: list[Pair], recs: list[Record], grads,
                  nb: int, A: list, D: list) -> None:
    """Write the factors of ``layer``'s pairs into ``A`` / ``D`` (consumes one gradient per
    record target from the iterator ``grads``)."""
    if hasattr(layer.rule, "pair_factors"):
        _multi_factors(fn, layer, pairs, recs, grads, A, D)
        return
    a_parts, d_parts = [], []
    for r in recs:
        g = next(grads)
        if g is None:
            g = torch.zeros_like(r.out)
        a, d = layer.rule.factors(layer.module, r.x, g)
        a_parts.append(a)
        d_parts.append(d)
    a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 1)
    d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, 1)
    T = a.shape[1]
    single = len(layer.pairs) == 1
    for j in layer.pairs:
        q = pairs[j]
        if q.T != T:
            fail(fn, f"layer '{layer.name}' to cover the same {q.T} positions for every sample "
                 "block (data-dependent layer use is not supported)", T, raw=True)
        if single:
            A[j], D[j] = a.contiguous(), d.contiguous()
        else:
            gi, go = q.group * q.d_in, q.group * q.d_out
            A[j] = a[..., gi : gi + q.d_in].contiguous()
            D[j] = d[..., go : go + q.d_out].contiguous()


def _multi_factors(fn: str, layer: Layer, pairs: list[Pair], recs: list[Record], grads,
                   A: list, D: list) -> None:
    parts = []
    for r in recs:
        g = [next(grads) for _ in r.targets]
        parts.append(layer.rule.pair_factors(layer.module, r.x, g))
    for k, j in enumerate(layer.pairs):
        a = [p[k][0] for p in parts]
        d = [p[k][1] for p in parts]
        a = a[0] if len(a) == 1 else torch.cat(a, 1)
        d = d[0] if len(d) == 1 else torch.cat(d, 1)
        q = pairs[j]
        if q.T != a.shape[1]:
            fail(fn, f"layer '{layer.name}' to cover the same {q.T} positions for every sample "
                 "block (data-dependent layer use is not supported)", a.shape[1], raw=True)
        A[j], D[j] = a.contiguous(), d.contiguous()
