"""The per-sample gradient engine: capture, planning, fallback, engine, products, public API.

Modules, one job each:

* :mod:`.inputs`: the samples (tensor, tuple or dict batches; a ``forward`` adapter);
* :mod:`.options`: the one keyword-only option set, validated once;
* :mod:`.capture`: one rule per layer kind (factors: Linear, Conv1d, Conv2d, Embedding; direct
  per-sample gradients: Conv1d/Conv2d as one grouped convolution backward, BatchNorm in eval,
  LayerNorm, GroupNorm) and the hooked forward pass;
* :mod:`.planning`: the cost model (ghost or materialised per pair, with the measured rate of
  the direct convolution gradients) and block sizes;
* :mod:`.fallback`: ``torch.func`` per-sample gradients for every other parameter;
* :mod:`.engine`: the engine of one call (complete after construction) and the scaling that
  keeps norms and cosines free of underflow;
* :mod:`.products`: one pass, many products (norms, dots, Gram, ``G^T U``);
* :mod:`.api`: the public functions; :mod:`.fisher`: the empirical Fisher operator.

Conventions: parameter order ``model.parameters()`` with ``requires_grad``; the gradient of
sample i is that of its own loss (a batch of one); models with batch-coupled layers (BatchNorm
in training mode) are refused, in eval mode they are fine; the model's mode is never changed,
no hook stays attached and no ``.grad`` is written.
"""

from __future__ import annotations

from .api import (
    PerSampleProducts,
    gradient_alignment,
    gradient_covariance_eigs,
    gradient_gram,
    gradient_norms,
    per_sample_grads,
    per_sample_products,
)
from .fisher import EmpiricalFisherOperator, fisher_eigs
from .options import DEFAULT_MEMORY_BUDGET, PerSampleOptions

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "EmpiricalFisherOperator",
    "PerSampleOptions",
    "PerSampleProducts",
    "fisher_eigs",
    "gradient_alignment",
    "gradient_covariance_eigs",
    "gradient_gram",
    "gradient_norms",
    "per_sample_grads",
    "per_sample_products",
]
