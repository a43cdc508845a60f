"""Models: reference parameter counts, seeded init, forward shapes, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from hbkernels import flatten_params, num_params
from hbkernels.boundary.datasets import load_dataset
from hbkernels.boundary.models import (
    CNN,
    FNN,
    FNN2Layer,
    LeNet5,
    default_model_for,
    load_model,
    make_model,
    model_spec,
    save_model,
)

# reference_setup.md section 2 (the 8x8 CNN is ours: padding 1, 32x2x2 features)
COUNTS = [
    ("fnn2", 2, 3, {}, 10703),
    ("fnn2", 2, 2, {}, 10602),
    ("fnn2", 2, 4, {}, 10804),
    ("fnn2", 2, 3, {"width": 30}, 1113),
    ("fnn2", 4, 3, {"width": 50}, 2953),
    ("fnn2", 2, 3, {"width": 50}, 2853),
    ("fnn", 1, 2, {"width": 10}, 42),
    ("cnn", 1, 3, {}, 7203),
    ("cnn", 1, 4, {}, 8004),
    ("cnn", 1, 10, {}, 12810),
    ("cnn", (1, 8, 8), 3, {}, 160 + 4640 + 128 * 3 + 3),
    ("lenet5", 3, 10, {}, 62006),
    ("lenet5", 3, 3, {}, 61411),
]


@pytest.mark.parametrize("arch,inp,c,kw,count", COUNTS)
def test_reference_parameter_counts(arch, inp, c, kw, count):
    assert num_params(make_model(arch, inp, c, **kw)) == count


def test_layer_names_follow_the_reference_order():
    m = make_model("fnn2", 2, 3)
    assert isinstance(m, FNN2Layer)
    assert list(m.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                    "fc3.weight", "fc3.bias"]
    assert [tuple(p.shape) for p in m.parameters()] == [(100, 2), (100,), (100, 100), (100,),
                                                        (3, 100), (3,)]
    assert isinstance(make_model("fnn", 1, 2, width=10), FNN)
    assert isinstance(make_model("cnn", 1, 3), CNN)
    assert isinstance(make_model("lenet5", 3, 10), LeNet5)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = make_model("fnn2", 2, 3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = make_model("fnn2", 2, 3, seed=5)
    c = make_model("fnn2", 2, 3, seed=6)
    assert torch.equal(flatten_params(a), flatten_params(b))
    assert not torch.equal(flatten_params(a), flatten_params(c))
    d = make_model("fnn2", 2, 3, seed=5, dtype=torch.float64)
    assert d.fc1.weight.dtype == torch.float64
    assert torch.equal(flatten_params(d), flatten_params(a).double())
    for arch, inp in (("cnn", 1), ("lenet5", 3)):
        assert torch.equal(flatten_params(make_model(arch, inp, 3, seed=1)),
                           flatten_params(make_model(arch, inp, 3, seed=1)))


def test_init_is_torch_default_uniform():
    m = make_model("fnn2", 2, 3, seed=11)
    # the first layer built under seed 11 is the same draw as a Linear(2, 100) under seed 11
    torch.manual_seed(11)
    first = torch.nn.Linear(2, 100)
    assert torch.equal(m.fc1.weight, first.weight) and torch.equal(m.fc1.bias, first.bias)
    bound = 1 / math.sqrt(100)
    m.requires_grad_(False)
    assert float(m.fc2.weight.abs().max()) <= bound and float(m.fc2.bias.abs().max()) <= bound
    # U(-b, b) has std b / sqrt(3); 10^4 draws give it to about 1 %
    assert float(m.fc2.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_forward_shapes_activations_and_log_softmax():
    x = torch.randn(5, 2)
    for act in ("relu", "sigmoid", "tanh"):
        m = make_model("fnn2", 2, 3, activation=act, seed=0)
        h = m.fc2(getattr(torch, act)(m.fc1(x)))
        expect = m.fc3(getattr(torch, act)(h))
        torch.testing.assert_close(m(x), expect)
    ls = make_model("fnn2", 2, 3, log_softmax=True, seed=0)
    torch.testing.assert_close(ls(x).exp().sum(1), torch.ones(5))
    torch.testing.assert_close(ls(x), torch.log_softmax(make_model("fnn2", 2, 3, seed=0)(x), 1))
    img = make_model("fnn2", (1, 8, 8), 3, width=20)  # MLP flattens image inputs
    assert img(torch.rand(4, 1, 8, 8)).shape == (4, 3)
    assert make_model("cnn", 1, 3)(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    assert make_model("cnn", (1, 8, 8), 4)(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    assert make_model("lenet5", 3, 10)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # inputs are cast to the model dtype, as the reference CNN casts to float
    cnn64 = make_model("cnn", 1, 3, dtype=torch.float64)
    assert cnn64(torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8)).dtype == torch.float64


@pytest.mark.parametrize("name,count", [("gauss", 10703), ("hierarchical", 10804),
                                        ("circle", 10602), ("intro", 42), ("iris", 2953),
                                        ("digits-017", 5187)])
def test_default_model_for_reference_datasets(name, count):
    ds = load_dataset(name)
    m = default_model_for(ds, seed=0)
    assert num_params(m) == count
    assert m(ds.X_train[:3]).shape == (3, ds.num_classes)


def test_default_model_for_width_seed_dtype():
    ds = load_dataset("gauss", dtype=torch.float64)
    m = default_model_for(ds, width=30, seed=3)
    assert num_params(m) == 1113 and m.fc1.weight.dtype == torch.float64
    assert torch.equal(flatten_params(m), flatten_params(make_model("fnn2", 2, 3, width=30,
                                                                      seed=3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="hbk.default_model_for: expected width=None"):
        default_model_for(load_dataset("digits-017"), width=50)


def test_save_and_load_round_trip(tmp_path):
    for m in (make_model("fnn2", 2, 3, width=(7, 9), seed=2, log_softmax=True),
              make_model("cnn", (1, 8, 8), 3, seed=1),
              make_model("fnn", 1, 2, width=10, seed=4).double()):
        with torch.no_grad():
            next(m.parameters()).add_(0.5)  # trained weights differ from the seeded init
        save_model(m, tmp_path / "m.pt", note="x")
        back = load_model(tmp_path / "m.pt")
        assert type(back) is type(m)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                     back.state_dict().values()))
        assert next(back.parameters()).dtype == next(m.parameters()).dtype
    assert model_spec(make_model("fnn2", 2, 3))["arch"] == "fnn2"


def test_errors():
    with pytest.raises(ValueError, match="hbk.make_model: expected arch"):
        make_model("resnet", 2, 3)
    with pytest.raises(TypeError, match="hbk.make_model: expected a floating torch.dtype"):
        make_model("fnn2", 2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="expected activation"):
        make_model("fnn2", 2, 3, activation="gelu")
    with pytest.raises(ValueError, match="expected no width/activation for cnn"):
        make_model("cnn", 1, 3, width=50)
    with pytest.raises(ValueError, match="expected images large enough"):
        make_model("lenet5", (3, 8, 8), 10)
    with pytest.raises(ValueError, match="hbk.model_spec"):
        model_spec(torch.nn.Linear(2, 2))


def test_check_model_data_names_the_mismatch():
    from hbkernels.boundary.datasets import load_dataset
    from hbkernels.boundary.models import check_model_data

    gauss = load_dataset("gauss")
    assert check_model_data("hbk.t", make_model("fnn2", 2, 3, width=4), gauss) is not None
    with pytest.raises(ValueError, match=r"hbk.t: expected a model that takes gauss inputs of "
                                         r"shape \(2,\) \(it was built for in_features=4\)"):
        check_model_data("hbk.t", make_model("fnn2", 4, 3, width=4), gauss)
    with pytest.raises(ValueError, match=r"hbk.t: expected a model with 3 outputs for gauss"):
        check_model_data("hbk.t", make_model("fnn2", 2, 2, width=4), gauss)
    m = make_model("fnn2", 2, 3, width=4)
    with torch.no_grad():
        m.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hbk.t: expected finite model parameters, got 1"):
        check_model_data("hbk.t", m, gauss)
    with pytest.raises(TypeError, match="hbk.t: expected an nn.Module"):
        check_model_data("hbk.t", "model", gauss)
    mixed = make_model("fnn2", 2, 3, width=4)
    mixed.fc1.double()
    with pytest.raises(TypeError, match="one floating dtype"):
        check_model_data("hbk.t", mixed, gauss)


def test_load_model_names_damaged_and_foreign_files(tmp_path):
    from hbkernels.fileio import CorruptFileError

    p = tmp_path / "m.pt"
    save_model(make_model("fnn2", 2, 3, width=4, seed=0), p)
    blob = p.read_bytes()
    (tmp_path / "t.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CorruptFileError, match=r"hbk.load_model: expected a save_model file, "
                                               r"got a damaged or foreign file .*t\.pt"):
        load_model(tmp_path / "t.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pt")
    with pytest.raises(CorruptFileError, match=r"expected a model file written by save_model"):
        load_model(tmp_path / "sd.pt")
    d = torch.load(p, weights_only=True)
    d["spec"]["width"] = 5  # a spec that does not fit its weights
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(CorruptFileError, match=r"expected a spec and weights that match"):
        load_model(tmp_path / "bad.pt")


def test_make_model_flags_and_seed_are_checked():
    with pytest.raises(TypeError,
                       match="hbk.make_model: expected log_softmax to be True or False"):
        make_model("fnn", 2, 3, width=4, log_softmax="False")
    with pytest.raises(ValueError, match="hbk.make_model: expected seed >= 0"):
        make_model("fnn", 2, 3, width=4, seed=-1)
