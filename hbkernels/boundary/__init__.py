"""The paper layer: datasets, models, training setups, measures, figures, experiments."""

from __future__ import annotations

from .datasets import Dataset, list_datasets, load_dataset, read_idx, reference_split
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

__all__ = [
    "Dataset", "load_dataset", "list_datasets", "reference_split", "read_idx",
    "ARCHS", "MLP", "FNN", "FNN2Layer", "CNN", "LeNet5", "make_model", "default_model_for",
    "model_spec", "save_model", "load_model",
    "LOSSES", "OPTIMIZERS", "SETUPS", "TrainConfig", "TrainResult", "loss_function", "accuracy",
    "train", "train_batched", "reference_config", "rescale_to_norm", "train_setup",
    "train_setups",
]
