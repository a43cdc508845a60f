"""The paper layer: the analysis of any classifier, its figures, and the paper's experiments.

Public paper API (plain tensors and any ``nn.Module``)::

    from hbkernels.boundary import analyze, Analysis, alignment_map, estimate_margin

    an = analyze(model, "ce", (X, y))          # spectrum, eps, G (exact or lower bound), ...
    print(an.G_text(), an.spectral_type.type)   # "G_max = 0.0334 (exact)", "MP"
    an.save("analysis.json")                    # scalars in JSON, tensors in analysis.pt
    an = Analysis.load("analysis.json")

Measures: :func:`analyze`, :func:`generalization_measure`, :func:`random_direction_threshold`,
:func:`roundoff_mask` (the round-off rule of eps and G), :func:`compute_spectrum`,
:func:`count_outliers`, :func:`spectral_type`, :func:`bulk_outliers`, :func:`class_spectra`,
:func:`estimate_margin`, :func:`alignment_map`. Figures (``plot_*``, PNG + PDF at 300 dpi)
are imported on first use. Files: :func:`load_model_file`, :func:`load_data_file`,
:func:`build_architecture`. Built-in datasets, models and training setups of the paper follow.
"""

from __future__ import annotations

from typing import Any

from .appendix import (
    DirectionFamilies,
    GradientCoherence,
    direction_families,
    family_vectors,
    gradient_coherence,
)
from .datasets import Dataset, list_datasets, load_dataset, read_idx, reference_split
from .loading import DataFile, build_architecture, load_data_file, load_model_file
from .margin import MarginResult, estimate_margin
from .measures import (
    ROUNDOFF_FACTOR,
    Analysis,
    GMeasure,
    GridAlignment,
    Outliers,
    Spectrum,
    Threshold,
    alignment_map,
    analyze,
    class_spectra,
    compute_spectrum,
    count_outliers,
    exact_spectrum_fits,
    generalization_measure,
    gradient_alignment,
    make_grid,
    parameter_norm,
    plane_grid,
    random_direction_threshold,
    random_directions,
    roundoff_mask,
)
from .models import (
    ARCHS,
    CNN,
    FNN,
    MLP,
    FNN2Layer,
    LeNet5,
    default_model_for,
    load_model,
    make_model,
    model_spec,
    save_model,
)
from .spectra import BulkOutliers, SpectralType, bulk_outliers, spectral_type
from .training import (
    LOSSES,
    OPTIMIZERS,
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

_PLOTS = ("MapRow", "g_note", "plot_alignment_curves", "plot_alignment_maps",
          "plot_embedding_alignment", "plot_gradient_coherence", "plot_margins",
          "plot_sample_alignment", "plot_spectra", "tsne_embedding")

__all__ = [  # noqa: RUF022 - grouped by purpose
    # the paper API
    "analyze", "Analysis", "generalization_measure", "GMeasure", "random_direction_threshold",
    "Threshold", "random_directions", "roundoff_mask", "ROUNDOFF_FACTOR", "compute_spectrum",
    "Spectrum", "exact_spectrum_fits", "count_outliers", "Outliers", "spectral_type",
    "SpectralType", "bulk_outliers", "BulkOutliers", "class_spectra", "estimate_margin",
    "MarginResult", "alignment_map", "GridAlignment", "gradient_alignment", "make_grid",
    "plane_grid", "parameter_norm",
    # the appendix analyses
    "direction_families", "DirectionFamilies", "family_vectors", "gradient_coherence",
    "GradientCoherence",
    # figures (imported on first use)
    "MapRow", "g_note", "plot_alignment_curves", "plot_alignment_maps",
    "plot_embedding_alignment", "plot_gradient_coherence", "plot_margins",
    "plot_sample_alignment", "plot_spectra", "tsne_embedding",
    # files
    "load_model_file", "load_data_file", "build_architecture", "DataFile",
    # built-in datasets, models, training
    "Dataset", "load_dataset", "list_datasets", "reference_split", "read_idx",
    "ARCHS", "MLP", "FNN", "FNN2Layer", "CNN", "LeNet5", "make_model", "default_model_for",
    "model_spec", "save_model", "load_model",
    "LOSSES", "OPTIMIZERS", "SETUPS", "TrainConfig", "TrainResult", "loss_function", "accuracy",
    "train", "train_batched", "reference_config", "rescale_to_norm", "train_setup",
    "train_setups",
]


def __getattr__(name: str) -> Any:
    """The figure functions, imported on first use (matplotlib is not loaded before)."""
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'hbkernels.boundary' has no attribute {name!r}")
