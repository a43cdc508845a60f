"""hbkernels.boundary.spectra: density types and bulk/outliers on constructed spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hbkernels.boundary.spectra import bulk_outliers, spectral_type


def _bulk(m: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, m)


def test_mainly_positive_trained_like_spectrum():
    lam = np.concatenate([_bulk(500), [5.0, 3.0, 2.5]])
    st = spectral_type(lam)
    assert st.type == "MP" and st.applicable and st.positive_share > 0.8


def test_mainly_negative_is_not_applicable():
    lam = np.concatenate([_bulk(500), [-5.0, -3.0, -2.5, 0.2]])
    st = spectral_type(torch.tensor(lam))
    assert st.type == "MN" and not st.applicable and st.positive_share < 0.2


def test_quasi_singular():
    lam = np.concatenate([np.zeros(1000), [1.0]])  # 0.1 % active
    assert spectral_type(lam).type == "QS"
    assert spectral_type(np.full(10, 1e-20), zero_atol=1e-12).type == "QS"
    # the same spectrum with a lower active-share threshold is MP
    assert spectral_type(lam, min_active_share=1e-4).type == "MP"


def test_mixed_and_thresholds():
    lam = np.array([1.0, -0.8, 0.5, -0.6])
    st = spectral_type(lam)
    assert st.type == "mixed" and 0.4 < st.positive_share < 0.6
    assert spectral_type(lam, positive_share=0.52).type == ("MP" if st.positive_share >= 0.52 else "mixed")


def test_density_weights_decide():
    nodes = np.array([-1.0, 0.0, 2.0])
    assert spectral_type(nodes, weights=[0.9, 0.05, 0.05]).type == "MN"  # mass -0.9 vs 0.1
    assert spectral_type(nodes, weights=[0.05, 0.05, 0.9]).type == "MP"


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"), ([1.0, float("nan")], "finite"), ("abc", "1-D sequence"),
])
def test_bad_eigenvalues(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        spectral_type(bad)


def test_bad_options():
    with pytest.raises(ValueError, match="positive_share > 0.5"):
        spectral_type([1.0], positive_share=0.5)
    with pytest.raises(ValueError, match="weights"):
        spectral_type([1.0, 2.0], weights=[1.0, -1.0])


def test_bulk_outliers_counts_classes():
    lam = np.concatenate([_bulk(300, scale=0.02), [9.0, 7.0, 6.0]])
    bo = bulk_outliers(lam, num_classes=3)
    assert bo.num_outliers == 3 and bo.matches_classes
    assert bo.bulk_width < 0.2 and bo.bulk_edge < 0.1
    assert bulk_outliers(lam, num_classes=10).matches_classes is False
    assert bulk_outliers(lam).matches_classes is None


def test_bulk_scales_with_width_only():
    small = bulk_outliers(np.concatenate([_bulk(300, scale=0.01), [9.0, 7.0]]))
    wide = bulk_outliers(np.concatenate([_bulk(300, scale=0.04), [9.0, 7.0]]))
    assert wide.bulk_width > 3 * small.bulk_width and wide.num_outliers == small.num_outliers == 2


def test_results_round_trip(tmp_path):
    st = spectral_type([3.0, 1.0, -0.1])
    back = type(st).load(st.save(tmp_path / "st.json"))
    assert back.type == st.type and back.positive_share == pytest.approx(st.positive_share)
