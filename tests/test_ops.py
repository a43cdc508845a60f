"""Operator registration: opcheck on every op, fake kernels, autograd, input validation."""

from __future__ import annotations

import pytest
import torch

import hbkernels as hbk

ops = torch.ops.hbkernels


def _f64(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def _factor_args():
    A = [_f64(6, 4), _f64(6, 3, 5, seed=1)]
    D = [_f64(6, 2, seed=2), _f64(6, 3, 3, seed=3)]
    W = [_f64(2, 4, 3, seed=4), _f64(3, 5, 3, seed=5)]
    Wb = [_f64(2, 3, seed=6), None]
    return A, D, W, Wb


def _op_samples():
    A, D, W, Wb = _factor_args()
    return [
        (ops.gram.default, (_f64(7, 5),)),
        (ops.gram.default, (_f64(7, 5, requires_grad=True),)),
        (ops.cosine_alignment.default, (_f64(7, 5), _f64(5, 2, seed=1))),
        (ops.cosine_alignment.default,
         (_f64(7, 5, requires_grad=True), _f64(5, 2, seed=1, requires_grad=True))),
        (ops.ghost_gram.default, (A, D, [True, False])),
        (ops.ghost_dots.default, (A, D, W, Wb)),
        (ops.ghost_sq_norms.default, (A, D, [True, False])),
        (ops.ghost_products.default, (A, D, [True, False], W, [Wb[0]])),
        (ops.ghost_products.default, (A, D, [False, False], W, [])),
        (ops.ghost_alignment.default, (A, D, W, Wb)),
        (ops.cosine_from_dots.default, (_f64(7, 2), _f64(7).abs(), _f64(2, seed=1).abs())),
        (ops.cosine_from_dots.default,
         (_f64(7, 2, requires_grad=True), _f64(7).abs().requires_grad_(),
          _f64(2, seed=1).abs().requires_grad_())),
    ]


@pytest.mark.parametrize("op,args", _op_samples(), ids=lambda x: getattr(x, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_every_registered_op_is_opchecked():
    tested = {op.__name__.split(".")[0] for op, _ in _op_samples()}
    registered = {name for name in dir(torch.ops.hbkernels) if not name.startswith("_")}
    registered -= {"name"}  # attribute of the namespace object, not an op
    assert registered <= tested, f"ops without an opcheck: {registered - tested}"


def test_torch_compile_fullgraph():
    G, V = _f64(9, 6), _f64(6, 3, seed=1)

    def fn(g, v):
        return hbk.cosine_alignment(g * 2.0, v).sum() + hbk.gram(g).trace()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(G, V), fn(G, V))


def test_torch_compile_dynamic_ghost_products():
    # Symbolic sizes go through the fake kernel's torch._check relations.
    A, D, W, Wb = _factor_args()

    def fn(a0, a1, d0, d1, w0, w1, b0):
        return hbk.ghost_products([a0, a1], [d0, d1], [True, False], [w0, w1], [b0])

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    args = (A[0], A[1], D[0], D[1], W[0], W[1], Wb[0])
    for got, want in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- fake kernels
def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _one_meta(args, which):
    """args with the `which`-th tensor (in a flat walk of the arguments) moved to meta."""
    out, count = [], 0
    for a in args:
        if isinstance(a, list):
            items = []
            for t in a:
                items.append(_meta(t) if isinstance(t, torch.Tensor) and count == which else t)
                count += isinstance(t, torch.Tensor)
            out.append(items)
        else:
            out.append(_meta(a) if isinstance(a, torch.Tensor) and count == which else a)
            count += isinstance(a, torch.Tensor)
    return out, count


@pytest.mark.parametrize("op,args", [s for s in _op_samples() if _one_meta(s[1], -1)[1] > 1],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_one_meta_argument_is_a_device_error(op, args):
    """A CPU and a meta argument dispatch to the fake kernel: an error, never CPU garbage."""
    _, count = _one_meta(args, -1)
    for which in range(count):
        mixed, _ = _one_meta(args, which)
        with pytest.raises(TypeError, match=r"hbk::\w+: expected .* on device"):
            op(*mixed)


@pytest.mark.parametrize("op,args", _op_samples(), ids=lambda x: getattr(x, "__name__", ""))
def test_all_meta_gives_the_real_shapes(op, args):
    real = op(*args)
    fake = op(*[[_meta(t) for t in a] if isinstance(a, list) else _meta(a) for a in args])
    for r, f in zip(real if isinstance(real, tuple) else (real,),
                    fake if isinstance(fake, tuple) else (fake,)):
        assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype


def _m(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: ops.gram(_m(2, 3, 4)), ValueError, r"hbk::gram: expected grads to be 2-D"),
        (lambda: ops.gram(_m(2, 3, dtype=torch.int32)), TypeError, "float32 or float64"),
        (lambda: ops.cosine_alignment(_m(3, 4), _m(5, 2)), ValueError,
         r"expected vectors of shape \(4, k\)"),
        (lambda: ops.cosine_alignment(_m(3, 4), _m(4, 2, dtype=torch.float64)), TypeError,
         "expected vectors to have dtype torch.float32"),
        (lambda: ops.ghost_gram([_m(3, 2)], [_m(4, 2)], [True]), ValueError, "share the leading"),
        (lambda: ops.ghost_gram([_m(3, 2)], [_m(3, 2)], [True, False]), ValueError,
         "one has_bias flag per layer"),
        (lambda: ops.ghost_sq_norms([_m(3, 2), _m(4, 2)], [_m(3, 2), _m(4, 2)], [True, True]),
         ValueError, "every layer to have n = 3"),
        (lambda: ops.ghost_sq_norms([_m(3, 5, 2)], [_m(3, 4, 2)], [True]), ValueError,
         "share the leading"),
        (lambda: ops.ghost_dots([_m(3, 2)], [_m(3, 4)], [_m(4, 3, 1)], [None]), ValueError,
         r"weight_vectors\[0\] of shape \(d_out, 2, 1\)"),
        (lambda: ops.ghost_alignment([_m(3, 2)], [_m(3, 4)], [_m(4, 2, 1)], [_m(4, 2)]),
         ValueError, r"bias_vectors\[0\] of shape \(4, 1\)"),
        (lambda: ops.ghost_products([_m(3, 2)], [_m(3, 4)], [True], [_m(4, 2, 1)], []),
         ValueError, r"one bias_vectors entry per layer with a bias \(1\)"),
        (lambda: ops.ghost_products([_m(3, 2)], [_m(3, 4)], [False], [_m(5, 2, 1)], []),
         ValueError, r"weight_vectors\[0\] of shape \(4, d_in, k\)"),
        (lambda: ops.cosine_from_dots(_m(3, 2), _m(4), _m(2)), ValueError,
         r"grad_sq_norms of shape \(3,\)"),
        (lambda: ops.cosine_from_dots(_m(3, 2), _m(3), _m(2, 1)), ValueError,
         "vector_sq_norms to be 1-D"),
    ],
)
def test_fake_kernels_check_shapes_and_dtypes(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# --------------------------------------------------------------------------- autograd
def test_gradcheck_gram():
    assert torch.autograd.gradcheck(ops.gram, (_f64(5, 4, requires_grad=True),))
    assert torch.autograd.gradcheck(hbk.gram, (_f64(3, 7, seed=1, requires_grad=True),))


def test_gradcheck_cosine_alignment():
    G, V = _f64(5, 4, requires_grad=True), _f64(4, 3, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(hbk.cosine_alignment, (G, V))
    assert torch.autograd.gradcheck(lambda g: hbk.cosine_alignment(g, V.detach()), (G,))


def test_gradcheck_cosine_from_dots():
    dots = _f64(5, 3, requires_grad=True)
    g = (_f64(5, seed=1).abs() + 0.5).requires_grad_()
    v = (_f64(3, seed=2).abs() + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(hbk.cosine_from_dots, (dots, g, v))


def test_cosine_from_dots_gradient_is_the_issue_case():
    # d/d dots of dots / (sqrt(g) sqrt(v)) is 1 / sqrt(g v), not 1 (the old silent gradient).
    dots = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.75], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    hbk.cosine_from_dots(dots, g, v).sum().backward()
    assert dots.grad.item() == pytest.approx(0.75 ** -0.5)  # 1.1547
    assert g.grad.item() == pytest.approx(-0.5 * 0.75 ** -1.5)
    assert v.grad.item() == pytest.approx(-0.5 * 0.75 ** -0.5)


def test_zero_norm_rows_have_zero_gradient():
    G = _f64(4, 3)
    G[1] = 0
    G.requires_grad_()
    hbk.cosine_alignment(G, _f64(3, 2, seed=1)).sum().backward()
    assert torch.all(G.grad[1] == 0) and torch.isfinite(G.grad).all()
    g = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
    hbk.cosine_from_dots(_f64(2, 2), g, torch.ones(2, dtype=torch.float64)).sum().backward()
    assert g.grad[0] == 0 and torch.isfinite(g.grad).all()


def test_gram_on_requires_grad_input_is_differentiable():
    G = _f64(4, 3, requires_grad=True)
    hbk.gram(G).sum().backward()  # was "mm(): functions with out=..."
    torch.testing.assert_close(G.grad, 2 * torch.ones(4, 4, dtype=torch.float64) @ G.detach())


def _ghost_calls(A, D, W, Wb):
    return {
        "ghost_gram": lambda: hbk.ghost_gram(A, D, [True, False]),
        "ghost_dots": lambda: hbk.ghost_dots(A, D, W, Wb),
        "ghost_sq_norms": lambda: hbk.ghost_sq_norms(A, D, [True, False]),
        "ghost_products": lambda: hbk.ghost_products(A, D, [True, False], W, [Wb[0]]),
        "ghost_alignment": lambda: hbk.ghost_alignment(A, D, W, Wb),
    }


@pytest.mark.parametrize("name", list(_ghost_calls(*_factor_args())))
def test_ghost_ops_refuse_requires_grad(name):
    A, D, W, Wb = _factor_args()
    D[1].requires_grad_()
    with pytest.raises(NotImplementedError,
                       match=rf"hbk\.{name} is not differentiable.*output_grads\[1\]"):
        _ghost_calls(A, D, W, Wb)[name]()
    with torch.no_grad():  # no graph is wanted: fine
        _ghost_calls(A, D, W, Wb)[name]()
    if name in ("ghost_dots", "ghost_products", "ghost_alignment"):
        A, D, W, Wb = _factor_args()
        Wb[0].requires_grad_()
        with pytest.raises(NotImplementedError, match=rf"hbk\.{name} is not differentiable"):
            _ghost_calls(A, D, W, Wb)[name]()


# --------------------------------------------------------------------------- values
def test_nan_in_nan_out():
    nan = float("nan")
    dots = _f64(3, 2)
    C = hbk.cosine_from_dots(dots, torch.tensor([1.0, nan, 0.0], dtype=torch.float64),
                             torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert torch.isnan(C[1]).all() and not torch.isnan(C[[0, 2]]).any()
    assert torch.all(C[2] == 0)  # zero norm: the documented 0
    G = _f64(4, 3)
    G[2, 1] = nan
    C = hbk.cosine_alignment(G, _f64(3, 2, seed=1))
    assert torch.isnan(C[2]).all() and not torch.isnan(C[[0, 1, 3]]).any()
    A, D, W, Wb = _factor_args()
    A[1][4, 2, 0] = nan
    assert torch.isnan(hbk.ghost_alignment(A, D, W, Wb)[4]).all()
    dots, sq = hbk.ghost_products(A, D, [True, False], W, [Wb[0]])
    assert torch.isnan(dots[4]).all() and torch.isnan(sq[4])
    assert not torch.isnan(sq[[0, 1, 2, 3, 5]]).any()
    assert torch.isnan(hbk.ghost_gram(A, D, [True, False])[4]).all()


@pytest.mark.parametrize("raw", [False, True])
def test_negative_squared_norms_are_errors(raw):
    f = ops.cosine_from_dots if raw else hbk.cosine_from_dots
    dots = _f64(3, 2)
    ok = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected grad_sq_norms >= 0.*-1.* at index 1"):
        f(dots, torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64), ok[:2])
    with pytest.raises(ValueError, match=r"expected vector_sq_norms >= 0"):
        f(dots, ok, torch.tensor([1.0, -0.5], dtype=torch.float64))
    f(dots, ok, torch.tensor([-0.0, 1.0], dtype=torch.float64))  # -0.0 is a zero norm


# --------------------------------------------------------------------------- wrapper checks
@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: hbk.gram(torch.zeros(3)), ValueError, "hbk.gram: expected grads to be 2-D"),
        (lambda: hbk.gram(torch.zeros(3, 3, dtype=torch.int64)), TypeError, "float32 or float64"),
        (lambda: hbk.gram([[1.0]]), TypeError, "expected grads to be a torch.Tensor"),
        (lambda: hbk.cosine_alignment(torch.zeros(3, 4), torch.zeros(5, 2)), ValueError,
         r"expected vectors of shape \(4, k\)"),
        (lambda: hbk.cosine_alignment(torch.zeros(3, 4), torch.zeros(4, 2, dtype=torch.float64)),
         TypeError, "expected vectors to have dtype torch.float32"),
        (lambda: hbk.ghost_gram([], [], []), ValueError, "at least one layer"),
        (lambda: hbk.ghost_gram([torch.zeros(3, 2)], [torch.zeros(4, 2)], [True]), ValueError,
         "share the leading"),
        (lambda: hbk.ghost_gram([torch.zeros(3, 2)], [torch.zeros(3, 2)], [True, False]),
         ValueError, "one has_bias flag per layer"),
        (lambda: hbk.ghost_gram([torch.zeros(3, 2)], [torch.zeros(3, 2)], ["False"]), TypeError,
         r"hbk.ghost_gram: expected has_bias\[0\] to be True or False, got 'False'"),
        (lambda: hbk.ghost_sq_norms([torch.zeros(3, 2)], [torch.zeros(3, 2)], [1]), TypeError,
         r"has_bias\[0\] to be True or False, got 1"),
        (lambda: hbk.ghost_sq_norms([torch.zeros(3, 2)], [torch.zeros(3, 2)], True), TypeError,
         "has_bias to be a list of bools"),
        (lambda: hbk.ghost_gram(torch.zeros(3, 2), [torch.zeros(3, 2)], [True]), TypeError,
         "inputs to be a list of tensors"),
        (lambda: hbk.ghost_products([torch.zeros(3, 2)], [torch.zeros(3, 2)], ["True"],
                                    [torch.zeros(2, 2, 1)], []), TypeError,
         r"has_bias\[0\] to be True or False"),
        (lambda: hbk.ghost_products([torch.zeros(3, 2)], [torch.zeros(3, 4)], [True],
                                    [torch.zeros(4, 2, 1)], []), ValueError,
         r"hbk.ghost_products: expected one bias_vectors entry per layer with a bias \(1\)"),
        (lambda: hbk.ghost_products([torch.zeros(3, 2), torch.zeros(3, 2)],
                                    [torch.zeros(3, 4)] * 2, [False, True],
                                    [torch.zeros(4, 2, 1)] * 2, [torch.zeros(4, 2)]),
         ValueError, r"expected bias_vectors\[0\] of shape \(4, 1\)"),
        (lambda: hbk.ghost_dots([torch.zeros(3, 2)], [torch.zeros(3, 4)],
                                [torch.zeros(4, 3, 1)], [None]),
         ValueError, r"weight_vectors\[0\] of shape \(d_out, 2, 1\)"),
        (lambda: hbk.ghost_dots([torch.zeros(3, 2)], [torch.zeros(3, 4)],
                                [torch.zeros(5, 2, 1)], [None]),
         ValueError, r"weight_vectors\[0\] of shape \(4, d_in, k\)"),
        (lambda: hbk.ghost_alignment([torch.zeros(3, 2)], [torch.zeros(3, 4)],
                                     [torch.zeros(4, 2, 1)], [torch.zeros(4, 2)]),
         ValueError, r"bias_vectors\[0\] of shape \(4, 1\)"),
        (lambda: hbk.cosine_from_dots(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3)),
         ValueError, r"hbk.cosine_from_dots: expected vector_sq_norms of shape \(2,\)"),
        (lambda: hbk.cosine_from_dots(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2, 1)),
         ValueError, "vector_sq_norms to be 1-D"),
    ],
)
def test_bad_input_errors_name_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_cpp_checks_are_the_second_line():
    # Calling the op directly bypasses the Python checks; C++ still refuses with a named error.
    with pytest.raises(ValueError, match="hbk::gram: expected grads to have 2 dimensions"):
        ops.gram(torch.zeros(3))
    with pytest.raises(TypeError, match="hbk::cosine_alignment: expected vectors to have dtype"):
        ops.cosine_alignment(torch.zeros(2, 3), torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="hbk::ghost_products: expected one bias_vectors entry"):
        ops.ghost_products([torch.zeros(3, 2)], [torch.zeros(3, 4)], [True],
                           [torch.zeros(4, 2, 1)], [])
    with pytest.raises(ValueError, match=r"hbk::ghost_products: expected weight_vectors\[0\]"):
        ops.ghost_products([torch.zeros(3, 2)], [torch.zeros(3, 4)], [False],
                           [torch.zeros(4, 3, 1)], [])
