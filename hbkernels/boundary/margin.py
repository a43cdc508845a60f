"""Margin estimation with the top Hessian eigenvector (paper Appendix I.3, reference section 7).

1. Find a point ``x_b`` on the decision boundary: optimise an input so that its gradient
   ``g(x)`` (per-sample loss at the predicted label) aligns with the top eigenvector ``u_1``,
   minimising ``(cos^2(g(x), u_1) - 1)^2``. Several restarts run at once (one batched
   ``vmap(grad)`` per step), each from a seeded ``N(0, init_std^2)`` start; the reference
   schedule is SGD lr 0.01, weight decay 1e-3, 20 000 steps, learning rate x0.1 at step 5 000.
   The restart with the smallest final objective is kept.
2. ``x_t^max`` / ``x_t^min``: the training points with the largest / most negative signed
   alignment with ``u_1``.
3. Margin = ``min(|x_b - x_t^max|, |x_b - x_t^min|)`` (Euclidean, in input space).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..params import num_params, trainable_parameters, unflatten_like
from .measures import JsonResult, _model_dtype, gradient_alignment

__all__ = ["MarginResult", "boundary_objective", "estimate_margin", "find_boundary_points"]

REFERENCE_STEPS = 20_000
REFERENCE_MILESTONE_FRACTION = 0.25  # step 5 000 of 20 000


def _per_sample_loss(out: torch.Tensor, loss: str) -> torch.Tensor:
    label = out.argmax(dim=-1).detach()
    if loss == "ce":
        return F.cross_entropy(out, label)
    if loss == "nll":
        return F.nll_loss(out, label)
    if loss == "mse":  # one-hot by comparison: F.one_hot is not vmap-able
        onehot = (torch.arange(out.shape[-1], device=out.device) == label[..., None]).to(out.dtype)
        return F.mse_loss(out, onehot)
    raise ValueError(f"hbk.boundary.margin: expected loss 'ce', 'nll' or 'mse', got {loss!r}")


def boundary_objective(model: nn.Module, u: torch.Tensor, loss: str = "ce"):
    """The per-input objective ``x -> (cos^2(g(x), u) - 1)^2`` as a torch.func-friendly function.

    Args:
        model: the classifier.
        u: ``(p,)`` direction in ``model.parameters()`` order (normalised here).
        loss: per-sample loss at the predicted label.

    Returns:
        ``(objective, cos)`` functions of one input ``x`` (shape ``input_shape``), each
        returning a scalar.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({n: b for n, b in model.named_buffers()})
    u = u.reshape(-1).to(next(iter(params.values())).dtype)
    u = u / u.norm()

    def loss_of(prm, x):
        out = functional_call(model, ({**prm, **frozen},), (x.unsqueeze(0),))
        return _per_sample_loss(out, loss)

    def cos(x):
        g = grad(loss_of)(params, x)
        flat = torch.cat([g[n].reshape(-1) for n in names])
        return (flat @ u) / (flat.norm() + torch.finfo(flat.dtype).tiny)

    def objective(x):
        c = cos(x)
        return (c * c - 1.0) ** 2

    return objective, cos


def _linear_cosine(model: nn.Module, u: torch.Tensor, loss: str):
    """Batched, twice-differentiable ``cos(g(x), u)`` for models whose parameters all sit in
    ``nn.Linear`` layers on 2-D activations (MLPs), or None for other models.

    Per layer the per-sample gradient is ``d a^T`` (weight) and ``d`` (bias), with ``a`` the
    layer input and ``d`` the gradient of the sample's loss w.r.t. the layer output, so
    ``<g, u> = sum_l d^T U_l a + d^T u_b`` and ``|g|^2 = sum_l (|a|^2 + 1) |d|^2``. The
    ``d`` come from one ``autograd.grad`` of the summed per-sample losses with
    ``create_graph=True`` (samples are independent), so the result backpropagates into ``x``:
    one forward and two backward passes per step for all restarts, instead of a ``vmap`` of
    nested ``grad``.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = trainable_parameters(model)
    owned = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None}
    if not layers or any(id(p) not in owned for p in params):
        return None
    if any(not m.weight.requires_grad or (m.bias is not None and not m.bias.requires_grad)
           for m in layers):
        return None
    views = dict(zip((id(p) for p in params), unflatten_like(u / u.norm(), model)))

    def cos(x: torch.Tensor) -> torch.Tensor | None:
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        calls = [0]

        def hook(mod, inp, out):
            calls[0] += 1
            seen[id(mod)] = (inp[0], out)

        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            out = model(x)
        finally:
            for h in handles:
                h.remove()
        if calls[0] != len(layers) or any(seen[id(m)][0].dim() != 2 for m in layers):
            return None  # a layer reused or applied to (n, T, d) inputs: use the vmap path
        label = out.argmax(dim=-1).detach()
        if loss == "ce":
            per = F.cross_entropy(out, label, reduction="none")
        elif loss == "nll":
            per = F.nll_loss(out, label, reduction="none")
        else:
            per = F.mse_loss(out, F.one_hot(label, out.shape[-1]).to(out.dtype),
                             reduction="none").mean(-1)
        outs = [seen[id(m)][1] for m in layers]
        ds = torch.autograd.grad(per.sum(), outs, create_graph=True)
        dots = x.new_zeros(x.shape[0])
        sq = x.new_zeros(x.shape[0])
        for m, d in zip(layers, ds):
            a = seen[id(m)][0]
            dots = dots + torch.einsum("ro,oi,ri->r", d, views[id(m.weight)], a)
            dd = (d * d).sum(1)
            sq = sq + dd * (a * a).sum(1)
            if m.bias is not None:
                dots = dots + d @ views[id(m.bias)]
                sq = sq + dd
        return dots / (sq.sqrt() + torch.finfo(sq.dtype).tiny)

    return cos


def find_boundary_points(
    model: nn.Module,
    u: torch.Tensor,
    input_shape: Sequence[int],
    *,
    restarts: int = 8,
    steps: int = REFERENCE_STEPS,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    init_std: float = 1.0,
    init_mean: torch.Tensor | None = None,
    seed: int = 0,
    loss: str = "ce",
    quiet: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise ``restarts`` inputs at once so that their gradients align with ``u``.

    Args:
        model: the classifier (its dtype is used for the inputs).
        u: ``(p,)`` top Hessian eigenvector.
        input_shape: shape of one input.
        restarts: independent starts, optimised together.
        steps: SGD steps (reference 20 000; fewer are allowed).
        lr, weight_decay, gamma: SGD on the inputs (reference 0.01, 1e-3, 0.1).
        milestones: steps where the learning rate is multiplied by ``gamma`` (default: a
            quarter of ``steps``, i.e. the reference's 5 000 of 20 000).
        init_std: standard deviation of the starts (reference 1).
        init_mean: optional ``input_shape`` centre of the starts (default the origin).
        seed: seed of the starts.
        loss: per-sample loss.
        quiet: no progress bar.

    Returns:
        ``x (restarts, *input_shape)``, final objective ``(restarts,)``, final signed cosine
        ``(restarts,)``.
    """
    fn = "hbk.boundary.find_boundary_points"
    p = num_params(model)
    if u.numel() != p:
        raise ValueError(f"{fn}: expected u with {p} entries, got {u.numel()}")
    if restarts < 1 or steps < 0:
        raise ValueError(f"{fn}: expected restarts >= 1 and steps >= 0, got {restarts}, {steps}")
    dtype = _model_dtype(model)
    device = trainable_parameters(model)[0].device
    objective, cos = boundary_objective(model, u, loss)
    fast = _linear_cosine(model, u.reshape(-1).to(device=device, dtype=dtype), loss)
    gen = torch.Generator().manual_seed(int(seed))
    x0 = torch.randn(restarts, *input_shape, generator=gen, dtype=torch.float64) * init_std
    if init_mean is not None:
        x0 = x0 + init_mean.double().reshape(1, *input_shape)
    x = x0.to(device=device, dtype=dtype).requires_grad_(True)
    if milestones is None:
        milestones = [max(1, round(steps * REFERENCE_MILESTONE_FRACTION))]
    opt = torch.optim.SGD([x], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    grad_obj = vmap(grad(objective))
    if fast is not None and fast(x.detach().clone().requires_grad_(True)) is None:
        fast = None

    def step_grad(xd: torch.Tensor) -> torch.Tensor:
        if fast is None:
            return grad_obj(xd)
        xr = xd.clone().requires_grad_(True)
        c = fast(xr)
        (g,) = torch.autograd.grad(((c * c - 1.0) ** 2).sum(), xr)
        return g

    it = range(steps)
    if not quiet:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="margin search", unit="step", leave=False)
    for _ in it:
        g = step_grad(x.detach())
        x.grad = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        sched.step()
    xf = x.detach()
    with torch.no_grad():
        final_obj = vmap(objective)(xf)
        final_cos = vmap(cos)(xf)
    return xf, final_obj, final_cos


@dataclass
class MarginResult(JsonResult):
    """A margin estimate.

    Attributes:
        margin: ``min(dist_max, dist_min)``.
        x_b: ``input_shape`` the chosen boundary point.
        x_max, x_min: the training points with extreme signed alignment with ``u_1``.
        idx_max, idx_min: their indices in the training set.
        cos_max, cos_min: their alignments.
        dist_max, dist_min: distances from ``x_b``.
        chosen: index of the kept restart.
        restart_objective, restart_cos, restart_margin: per restart.
        x_restarts: ``(restarts, *input_shape)`` all final points.
        settings: the schedule used.
        seconds: wall time.
    """

    margin: float
    x_b: torch.Tensor
    x_max: torch.Tensor
    x_min: torch.Tensor
    idx_max: int
    idx_min: int
    cos_max: float
    cos_min: float
    dist_max: float
    dist_min: float
    chosen: int
    restart_objective: list[float]
    restart_cos: list[float]
    restart_margin: list[float]
    settings: dict
    seconds: float
    x_restarts: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "margin": self.margin, "x_b": self.x_b.reshape(-1), "x_max": self.x_max.reshape(-1),
            "x_min": self.x_min.reshape(-1), "idx_max": self.idx_max, "idx_min": self.idx_min,
            "cos_max": self.cos_max, "cos_min": self.cos_min, "dist_max": self.dist_max,
            "dist_min": self.dist_min, "chosen": self.chosen,
            "restart_objective": self.restart_objective, "restart_cos": self.restart_cos,
            "restart_margin": self.restart_margin, "settings": self.settings,
            "seconds": self.seconds,
        }


def estimate_margin(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    u: torch.Tensor,
    *,
    loss: str = "ce",
    **search: Any,
) -> MarginResult:
    """Estimate the margin of the decision boundary with the top Hessian eigenvector ``u``.

    Args:
        model: the classifier.
        data: ``(X_train, y_train)``; only ``X_train`` is used (alignment at predicted labels).
        u: ``(p,)`` or ``(p, 1)`` top eigenvector of the training-loss Hessian.
        loss: per-sample loss (``"ce"``, ``"nll"``, ``"mse"``).
        **search: options of :func:`find_boundary_points` (``restarts``, ``steps``, ``lr``,
            ``weight_decay``, ``milestones``, ``gamma``, ``init_std``, ``init_mean``, ``seed``,
            ``quiet``); defaults: 8 restarts and the reference schedule.

    Returns:
        :class:`MarginResult`.
    """
    t0 = time.perf_counter()
    X = data[0].to(_model_dtype(model))
    u = u.reshape(-1)
    params = inspect.signature(find_boundary_points).parameters
    unknown = set(search) - set(params)
    if unknown:
        raise TypeError(f"hbk.boundary.estimate_margin: unexpected options {sorted(unknown)}")
    settings = {k: search.get(k, params[k].default) for k in
                ("restarts", "steps", "lr", "weight_decay", "milestones", "gamma", "init_std",
                 "seed")}
    if settings["milestones"] is None:
        settings["milestones"] = [max(1, round(settings["steps"] * REFERENCE_MILESTONE_FRACTION))]
    settings["milestones"] = list(settings["milestones"])
    settings["loss"] = loss
    xs, obj, cs = find_boundary_points(model, u, tuple(X.shape[1:]), loss=loss, **search)
    restarts = xs.shape[0]
    a = gradient_alignment(model, X, u[:, None], labels="pred", loss=loss)[:, 0].double()
    i_max, i_min = int(torch.argmax(a)), int(torch.argmin(a))
    x_max, x_min = X[i_max].detach().cpu(), X[i_min].detach().cpu()
    flat = xs.detach().cpu().reshape(restarts, -1).double()
    d_max = (flat - x_max.reshape(1, -1).double()).norm(dim=1)
    d_min = (flat - x_min.reshape(1, -1).double()).norm(dim=1)
    margins = torch.minimum(d_max, d_min)
    objd = torch.nan_to_num(obj.detach().cpu().double(), nan=float("inf"))
    chosen = int(torch.argmin(objd))
    return MarginResult(
        margin=float(margins[chosen]), x_b=xs[chosen].detach().cpu(), x_max=x_max, x_min=x_min,
        idx_max=i_max, idx_min=i_min, cos_max=float(a[i_max]), cos_min=float(a[i_min]),
        dist_max=float(d_max[chosen]), dist_min=float(d_min[chosen]), chosen=chosen,
        restart_objective=[float(v) for v in objd], restart_cos=[float(v) for v in cs.cpu()],
        restart_margin=[float(v) for v in margins],
        settings=settings,
        seconds=time.perf_counter() - t0, x_restarts=xs.detach().cpu(),
    )
