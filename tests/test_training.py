"""Training: losses, both engines against plain autograd loops, seeding, setups and cache."""

from __future__ import annotations

import json

import pytest
import torch

from hbkernels import flatten_params
from hbkernels.boundary import training
from hbkernels.boundary.datasets import load_dataset
from hbkernels.boundary.models import default_model_for, make_model
from hbkernels.boundary.training import (
    SETUPS,
    TrainConfig,
    TrainResult,
    accuracy,
    loss_function,
    reference_config,
    rescale_to_norm,
    train,
    train_batched,
    train_setup,
    train_setups,
)


@pytest.fixture(scope="module")
def gauss():
    return load_dataset("gauss")


@pytest.fixture(scope="module")
def gauss64():
    return load_dataset("gauss", dtype=torch.float64)


def params_of(model):
    return flatten_params(model)


# ----------------------------------------------------------------------------------------------
# losses


def test_loss_functions_against_formulas():
    torch.manual_seed(0)
    out, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 2, 0])
    logp = out.log_softmax(1)
    torch.testing.assert_close(loss_function("ce")(out, y), -logp[torch.arange(6), y].mean())
    torch.testing.assert_close(loss_function("nll")(logp, y), -logp[torch.arange(6), y].mean())
    # MSE against the one-hot of all C = 4 classes although class 3 is absent from the batch
    onehot = torch.zeros(6, 4, dtype=torch.float64)
    onehot[torch.arange(6), y] = 1
    torch.testing.assert_close(loss_function("mse")(out, y), ((out - onehot) ** 2).mean())
    torch.testing.assert_close(loss_function("mse", num_classes=4)(out, y),
                               ((out - onehot) ** 2).mean())
    with pytest.raises(ValueError, match="expected outputs with 5 classes, got 4"):
        loss_function("mse", num_classes=5)(out, y)
    with pytest.raises(ValueError, match="hbk.loss_function: expected one of"):
        loss_function("hinge")


def test_accuracy():
    m = make_model("fnn2", 2, 3, width=5, seed=0)
    X = torch.randn(7, 2)
    pred = m(X).argmax(1)
    assert accuracy(m, X, pred) == 1.0
    assert accuracy(m, X, (pred + 1) % 3) == 0.0
    assert accuracy(m, X[:0], pred[:0]) != accuracy(m, X[:0], pred[:0])  # NaN for empty


# ----------------------------------------------------------------------------------------------
# the engines against hand-written reference loops


def reference_loop(model, ds, cfg):
    """The reference training loop, spelled out with autograd and plain tensor updates."""
    X, y = ds.X_train.to(cfg.dtype), ds.y_train
    n = len(y)
    bs = n if cfg.batch_size == "full" else cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = loss_function(cfg.loss)
    params = list(model.parameters())
    for _ in range(cfg.epochs):
        order = torch.arange(n) if bs >= n else torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            grads = torch.autograd.grad(loss_fn(model(X[idx]), y[idx]), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(cfg.lr * g)


@pytest.mark.parametrize("engine", ["stacked", "autograd"])
@pytest.mark.parametrize("batch_size", [64, "full", 7])
def test_engines_match_reference_sgd_loop(gauss64, engine, batch_size):
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=batch_size, dtype=torch.float64, seed=4,
                      engine=engine)
    a = make_model("fnn2", 2, 3, width=9, seed=1, dtype=torch.float64)
    b = make_model("fnn2", 2, 3, width=9, seed=1, dtype=torch.float64)
    res = train(a, gauss64, cfg)
    reference_loop(b, gauss64, cfg)
    assert res.model is a and res.info["engine"] == engine
    torch.testing.assert_close(params_of(a), params_of(b), atol=1e-12, rtol=1e-10)


LOSS_VARIANTS = [("ce", False), ("ce", True), ("nll", True), ("nll", False), ("mse", False),
                 ("mse", True)]


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("loss,log_softmax", LOSS_VARIANTS)
def test_stacked_backward_matches_autograd(gauss64, activation, loss, log_softmax):
    """The stacked engine's hand-written backward against autograd, for every optimizer."""
    for opt, extra in (("sgd", {"momentum": 0.5, "weight_decay": 1e-3}), ("adam", {}),
                       ("adamw", {"weight_decay": 1e-2}), ("rmsprop", {"momentum": 0.3})):
        cfg = TrainConfig(epochs=2, lr=0.01, loss=loss, optimizer=opt, dtype=torch.float64,
                          **extra)
        models = [make_model("fnn2", 2, 3, width=6, seed=2, activation=activation,
                             log_softmax=log_softmax, dtype=torch.float64) for _ in range(2)]
        r1 = train(models[0], gauss64, TrainConfig(**{**cfg.__dict__, "engine": "stacked"}))
        r2 = train(models[1], gauss64, TrainConfig(**{**cfg.__dict__, "engine": "autograd"}))
        torch.testing.assert_close(params_of(models[0]), params_of(models[1]), atol=1e-11,
                                   rtol=1e-9, msg=f"{opt} {activation} {loss} {log_softmax}")
        assert r1.history["loss"] == pytest.approx(r2.history["loss"], rel=1e-9)


def test_float32_engines_agree_and_fnn_is_stacked(gauss):
    a, b = (make_model("fnn", 2, 3, width=10, seed=0) for _ in range(2))
    ra = train(a, gauss, TrainConfig(epochs=20))
    rb = train(b, gauss, TrainConfig(epochs=20, engine="autograd"))
    assert ra.info["engine"] == "stacked"
    torch.testing.assert_close(params_of(a), params_of(b), atol=1e-5, rtol=1e-5)


def test_same_seed_same_model_and_batched_equals_single(gauss):
    cfg = TrainConfig(epochs=15, seed=3)
    runs = [params_of(train(make_model("fnn2", 2, 3, width=20, seed=7), gauss, cfg).model)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = train(make_model("fnn2", 2, 3, width=20, seed=7), gauss, TrainConfig(epochs=15, seed=4))
    assert not torch.equal(runs[0], params_of(other.model))
    seeds = [3, 5, 8]
    models = [make_model("fnn2", 2, 3, width=20, seed=7 + i) for i in range(3)]
    batched = train_batched(models, gauss, cfg, seeds=seeds)
    for i, (s, r) in enumerate(zip(seeds, batched)):
        alone = train(make_model("fnn2", 2, 3, width=20, seed=7 + i), gauss,
                      TrainConfig(epochs=15, seed=s))
        assert r.model is models[i] and r.config.seed == s
        assert r.info["models_trained_together"] == 3
        torch.testing.assert_close(params_of(r.model), params_of(alone.model), atol=1e-6,
                                   rtol=1e-6)
        assert r.history["loss"] == pytest.approx(alone.history["loss"], rel=1e-5)


def test_gauss_reference_run_learns(gauss):
    res = train(make_model("fnn2", 2, 3, seed=0), gauss, TrainConfig(epochs=200))
    assert res.train_acc == 1.0 and res.test_acc > 0.95
    assert res.history["loss"][-1] < 0.1 * res.history["loss"][0]
    assert res.epochs_per_second > 0 and res.val_acc > 0.9


def test_history_checkpoints_and_milestones(gauss):
    model = make_model("fnn2", 2, 3, width=8, seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(model, gauss, TrainConfig(epochs=10, checkpoint_every=4, log_every=3))
    assert res.history["epoch"] == [0, 3, 6, 9, 10]
    assert [e for e, _ in res.checkpoints] == [0, 4, 8, 10]
    assert all(torch.equal(init[k], v) for k, v in res.checkpoints[0][1].items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in res.checkpoints[-1][1].items())
    assert res.train_acc == res.history["train_acc"][-1]
    # gamma 0 at epoch 2: nothing moves afterwards (both engines)
    for engine in ("stacked", "autograd"):
        a, b = (make_model("fnn2", 2, 3, width=8, seed=0) for _ in range(2))
        train(a, gauss, TrainConfig(epochs=2, engine=engine))
        train(b, gauss, TrainConfig(epochs=5, milestones=(2,), gamma=0.0, engine=engine))
        assert torch.equal(params_of(a), params_of(b))


def test_small_models_train_on_one_thread_and_restore(gauss):
    seen = []
    model = make_model("fnn2", 2, 3, width=8, seed=0)
    # training forwards only (the size probe and the evaluations run without grad)
    model.register_forward_hook(
        lambda *a: seen.append(torch.get_num_threads()) if torch.is_grad_enabled() else None)
    before = torch.get_num_threads()
    train(model, gauss, TrainConfig(epochs=2, engine="autograd"))
    assert set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    train(model, gauss, TrainConfig(epochs=1, engine="autograd", threads=2))
    assert set(seen) == {2} and torch.get_num_threads() == before


def test_cnn_trains_with_autograd(gauss):
    ds = load_dataset("digits-017")
    model = default_model_for(ds, seed=0)
    res = train(model, ds, TrainConfig(epochs=3, lr=0.1, batch_size=32))
    assert res.info["engine"] == "autograd"
    assert res.train_acc > 0.6  # 3 classes: chance is 0.36
    with pytest.raises(ValueError, match="expected identical MLP models"):
        train(model, ds, TrainConfig(epochs=1, engine="stacked"))


def test_result_json_save_and_load(gauss, tmp_path):
    res = train(make_model("fnn2", 2, 3, width=8, seed=0), gauss,
                TrainConfig(epochs=4, checkpoint_every=2, dtype=torch.float64))
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["config"]["dtype"] == "float64"
    assert d["checkpoint_epochs"] == [0, 2, 4] and d["param_norm"] == pytest.approx(res.param_norm)
    back = TrainResult.load(res.save(tmp_path / "run"))
    assert back.cached and back.config == res.config and back.history == res.history
    assert torch.equal(params_of(back.model), params_of(res.model))
    assert [e for e, _ in back.checkpoints] == [0, 2, 4]


def test_config_validation(gauss):
    inf, nan = float("inf"), float("nan")
    for bad, msg in (({"epochs": -1}, "epochs >= 0"), ({"batch_size": 0}, "batch_size"),
                     ({"optimizer": "lbfgs"}, "optimizer to be one of"),
                     ({"loss": "l1"}, "loss to be one of"),
                     ({"momentum": 0.9, "optimizer": "adam"}, "momentum only"),
                     ({"engine": "jit"}, "engine to be one of"),
                     ({"lr": inf}, "lr to be finite"), ({"lr": nan}, "lr to be finite"),
                     ({"lr": 0.0}, "lr > 0"), ({"lr": -1e-3}, "lr > 0"),
                     ({"momentum": nan}, "momentum to be finite"),
                     ({"momentum": 1.0}, "momentum < 1"), ({"momentum": -0.1}, "momentum >= 0"),
                     ({"weight_decay": inf}, "weight_decay to be finite"),
                     ({"weight_decay": -1.0}, "weight_decay >= 0"),
                     ({"gamma": nan}, "gamma to be finite"),
                     ({"checkpoint_every": -5}, "checkpoint_every >= 0"),
                     ({"batch_size": "half"}, "batch_size 'full' or an int"),
                     ({"milestones": (0,)}, "milestones entries >= 1"),
                     ({"log_every": 0}, "log_every >= 1"), ({"threads": 0}, "threads >= 1"),
                     ({"seed": -1}, "seed >= 0")):
        with pytest.raises(ValueError, match=f"hbk.TrainConfig: expected {msg}"):
            train(make_model("fnn2", 2, 3, width=4), gauss, TrainConfig(**bad))
    with pytest.raises(TypeError, match="floating torch.dtype"):
        TrainConfig(dtype=torch.int32).validate()
    for bad, msg in (({"epochs": 2.5}, "epochs to be an int"), ({"lr": "0.1"}, "lr to be a real"),
                     ({"batch_size": 1.5}, "batch_size 'full' or an int"),
                     ({"quiet": "no"}, "quiet to be True or False"),
                     ({"epochs": True}, "epochs to be an int")):
        with pytest.raises(TypeError, match=f"hbk.TrainConfig: expected {msg}"):
            TrainConfig(**bad).validate()
    assert TrainConfig.from_dict(TrainConfig(milestones=(3,)).to_dict()) == TrainConfig(
        milestones=(3,))


# ----------------------------------------------------------------------------------------------
# setups


def test_reference_configs():
    c = reference_config("gauss", "normal")
    assert (c.epochs, c.lr, c.batch_size, c.optimizer, c.loss) == (2000, 0.02, 64, "sgd", "ce")
    assert [reference_config("gauss", s).epochs for s in SETUPS[:4]] == [2000, 300_000, 20_000,
                                                                         1000]
    assert reference_config("circle", "random-label").epochs == 20_000
    assert reference_config("half-moon", "large-norm").epochs == 5000
    assert reference_config("checkerboard-linear", "wide-margin").epochs == 2000
    iris = reference_config("iris", "random-label")
    assert (iris.epochs, iris.lr, iris.batch_size) == (200_000, 0.01, "full")
    assert reference_config("intro", "normal").lr == 0.002
    assert reference_config("mnist-017", "random-label").epochs == 5000
    assert reference_config("digits-179", "adversarial").epochs == 500
    cifar = reference_config("cifar", "normal")
    assert (cifar.momentum, cifar.weight_decay, cifar.milestones) == (0.9, 5e-4, (76, 153, 230))
    with pytest.raises(ValueError, match="expected 'checkerboard-linear' for wide-margin"):
        reference_config("gauss", "wide-margin")


def test_rescale_to_norm():
    m = make_model("fnn2", 2, 3, width=5, seed=0)
    before = params_of(m).clone()
    f = rescale_to_norm(m, 12.5)
    assert float(params_of(m).norm()) == pytest.approx(12.5, rel=1e-6)
    torch.testing.assert_close(params_of(m), before * f)
    with pytest.raises(ValueError, match="hbk.rescale_to_norm"):
        rescale_to_norm(m, 0.0)


SMALL = {"width": 10}


def test_setup_normal_is_seeded():
    a = train_setup("normal", "gauss", seed=1, epochs={"normal": 20}, **SMALL)
    b = train_setup("normal", "gauss", seed=1, epochs={"normal": 20}, **SMALL)
    c = train_setup("normal", "gauss", seed=2, epochs={"normal": 20}, **SMALL)
    assert torch.equal(params_of(a.model), params_of(b.model))
    assert not torch.equal(params_of(a.model), params_of(c.model))
    assert a.info["setup"] == "normal" and a.info["seed"] == 1 and a.config.epochs == 20
    assert not a.cached and len(a.info["key"]) == 64


def test_large_norm_starts_at_the_random_label_norm():
    eps = {"random-label": 40, "large-norm": 0}
    ln = train_setup("large-norm", "gauss", seed=3, epochs=eps, **SMALL)
    rl = train_setup("random-label", "gauss", seed=3, epochs=eps, **SMALL)
    assert ln.param_norm == pytest.approx(rl.param_norm, rel=1e-6)
    assert ln.info["parent"]["param_norm"] == pytest.approx(rl.param_norm, rel=1e-12)
    fresh = make_model("fnn2", 2, 3, seed=3, **SMALL)
    scale = rl.param_norm / float(params_of(fresh).double().norm())
    assert ln.info["scale"] == pytest.approx(scale, rel=1e-6) and scale > 1
    torch.testing.assert_close(params_of(ln.model), params_of(fresh) * scale)  # every tensor


def test_adversarial_starts_from_the_random_label_weights():
    rl = train_setup("random-label", "gauss", seed=0, epochs={"random-label": 40}, **SMALL)
    assert rl.info["random_labels"]
    adv0 = train_setup("adversarial", "gauss", seed=0,
                       epochs={"random-label": 40, "adversarial": 0}, **SMALL)
    assert torch.equal(params_of(adv0.model), params_of(rl.model))
    adv = train_setup("adversarial", "gauss", seed=0, checkpoint_every=5,
                      epochs={"random-label": 40, "adversarial": 5}, **SMALL)
    assert torch.equal(flatten_from(adv.checkpoints[0][1]), params_of(rl.model))
    assert not adv.info["random_labels"] and adv.info["parent"]["setup"] == "random-label"


def flatten_from(state_dict):
    return torch.cat([v.reshape(-1) for v in state_dict.values()])


def test_wide_margin_pretrains_on_noisy_checkerboard():
    eps = {"normal": 30, "wide-margin": 0}
    wm = train_setup("wide-margin", "checkerboard-linear", seed=0, epochs=eps, **SMALL)
    noisy = train_setup("normal", "checkerboard-noisy", seed=0, epochs=eps, **SMALL)
    assert torch.equal(params_of(wm.model), params_of(noisy.model))
    assert wm.info["parent"]["dataset"] == "checkerboard-noisy"
    assert wm.info["dataset"] == "checkerboard-linear"
    with pytest.raises(ValueError, match="expected dataset 'checkerboard-linear' for wide-margin"):
        train_setup("wide-margin", "gauss", seed=0)


def test_cache_trains_each_phase_once(tmp_path, monkeypatch):
    calls = []
    real_fit = training._fit

    def counting_fit(models, dataset, cfg, seeds, desc="train"):
        calls.append((dataset.name, dataset.random_labels, cfg.epochs, tuple(seeds)))
        return real_fit(models, dataset, cfg, seeds, desc)

    monkeypatch.setattr(training, "_fit", counting_fit)
    eps = {"random-label": 30, "adversarial": 10, "large-norm": 10}
    kw = {"epochs": eps, "cache_dir": tmp_path, **SMALL}
    adv = train_setup("adversarial", "gauss", seed=0, **kw)
    assert calls == [("gauss", True, 30, (0,)), ("gauss", False, 10, (0,))]
    ln = train_setup("large-norm", "gauss", seed=0, **kw)  # reuses the random-label model
    assert calls[2:] == [("gauss", False, 10, (0,))]
    assert ln.info["parent"]["key"] == adv.info["parent"]["key"]
    again = train_setup("adversarial", "gauss", seed=0, **kw)
    assert len(calls) == 3 and again.cached
    assert torch.equal(params_of(again.model), params_of(adv.model))
    assert again.history == adv.history and again.seconds == adv.seconds
    # a different setting is a different run; checkpoints asked for later force a rerun
    train_setup("adversarial", "gauss", seed=0, **{**kw, "epochs": {**eps, "adversarial": 11}})
    assert calls[3:] == [("gauss", False, 11, (0,))]
    ck = train_setup("adversarial", "gauss", seed=0, checkpoint_every=5, **kw)
    assert calls[4:] == [("gauss", False, 10, (0,))] and not ck.cached
    assert [e for e, _ in ck.checkpoints] == [0, 5, 10]
    assert train_setup("adversarial", "gauss", seed=0, checkpoint_every=5, **kw).cached
    assert len(calls) == 5
    dirs = sorted(p.name.split("--")[1] for p in tmp_path.iterdir()
                  if not p.name.startswith("."))
    assert dirs == ["adversarial", "adversarial", "large-norm", "random-label"]


def test_train_setups_batches_seeds_like_single_runs(tmp_path):
    eps = {"random-label": 20, "adversarial": 6}
    many = train_setups("adversarial", "circle", [0, 1], epochs=eps, cache_dir=tmp_path, **SMALL)
    assert [r.info["seed"] for r in many] == [0, 1]
    assert many[0].info["models_trained_together"] == 2
    for seed, r in zip([0, 1], many):
        alone = train_setup("adversarial", "circle", seed=seed, epochs=eps, **SMALL)
        torch.testing.assert_close(params_of(r.model), params_of(alone.model), atol=1e-6,
                                   rtol=1e-6)
        assert train_setup("adversarial", "circle", seed=seed, epochs=eps, cache_dir=tmp_path,
                           **SMALL).cached


def test_within_hierarchy_random_labels_and_float64():
    r = train_setup("random-label", "hierarchical", seed=0, random_type="within",
                    epochs={"random-label": 3}, dtype=torch.float64, **SMALL)
    assert r.info["settings"]["random_type"] == "within"
    assert r.model.fc1.weight.dtype == torch.float64 and r.config.dtype == torch.float64


def test_setup_errors():
    with pytest.raises(ValueError, match="hbk.train_setup: expected setup to be one of"):
        train_setup("sharp", "gauss", seed=0)
    with pytest.raises(ValueError, match=r"expected a dataset name, one of gauss.*got 'nope'"):
        train_setup("normal", "nope", seed=0)
    with pytest.raises(ValueError, match=r"hbk.reference_config: expected a dataset name"):
        reference_config("nope", "normal")
    for kw, exc, msg in (({"epochs": {"normal": -3}}, ValueError, r"epochs\['normal'\] >= 0"),
                         ({"checkpoint_every": -5}, ValueError, "checkpoint_every >= 0"),
                         ({"width": 0}, ValueError, "width >= 1"),
                         ({"quiet": "yes"}, TypeError, "quiet to be True or False"),
                         ({"random_type": "x"}, ValueError, "random_type to be one of")):
        with pytest.raises(exc, match=f"hbk.train_setup: expected {msg}"):
            train_setup("normal", "gauss", seed=0, **kw)
    with pytest.raises(ValueError, match="hbk.train_setup: expected seed >= 0"):
        train_setups("normal", "gauss", [-1])
    with pytest.raises(ValueError, match="expected epochs keys in"):
        train_setup("normal", "gauss", seed=0, epochs={"pretrain": 3})
    with pytest.raises(ValueError, match="expected distinct seeds"):
        train_setups("normal", "gauss", [1, 1])


def test_divergence_stops_training_with_a_clear_error(gauss):
    from hbkernels.boundary.training import TrainingDivergedError

    for engine in ("stacked", "autograd"):
        m = make_model("fnn2", 2, 3, width=4, seed=0)
        with pytest.raises(TrainingDivergedError,
                           match=r"hbk.train: expected a finite training loss, got (nan|inf) at "
                                 r"epoch \d+ of 300 .*lr 1e\+06"):
            train(m, gauss, TrainConfig(epochs=300, lr=1e6, engine=engine))
    models = [make_model("fnn2", 2, 3, width=4, seed=s) for s in range(2)]
    with pytest.raises(TrainingDivergedError, match="seeds 0, 1"):
        train_batched(models, gauss, TrainConfig(epochs=50, lr=1e7), seeds=[0, 1])


def test_model_data_mismatch_is_named_before_training(gauss):
    import dataclasses

    with pytest.raises(ValueError, match=r"hbk.train: expected a model that takes gauss inputs "
                                         r"of shape \(2,\)"):
        train(make_model("fnn2", 3, 3, width=4), gauss, TrainConfig(epochs=1))
    with pytest.raises(ValueError, match=r"hbk.train: expected a model with 3 outputs for gauss"):
        train(make_model("fnn2", 2, 5, width=4), gauss, TrainConfig(epochs=1))
    X = gauss.X_train.clone()
    X[3, 1] = float("nan")
    with pytest.raises(ValueError, match="hbk.train: expected finite training inputs, got 1"):
        train(make_model("fnn2", 2, 3, width=4), dataclasses.replace(gauss, X_train=X),
              TrainConfig(epochs=1))
    with pytest.raises(TypeError, match="hbk.train: expected config to be a TrainConfig"):
        train(make_model("fnn2", 2, 3, width=4), gauss, {"lr": 0.1})


def test_rescale_to_norm_refuses_bad_targets():
    m = make_model("fnn2", 2, 3, width=4, seed=0)
    for bad in (float("inf"), float("nan"), 0.0, -2.0):
        with pytest.raises(ValueError, match="hbk.rescale_to_norm: expected target_norm"):
            rescale_to_norm(m, bad)
    with pytest.raises(TypeError, match="hbk.rescale_to_norm: expected target_norm to be a real"):
        rescale_to_norm(m, "3")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    with pytest.raises(ValueError, match="finite, positive parameter norm"):
        rescale_to_norm(m, 3.0)
