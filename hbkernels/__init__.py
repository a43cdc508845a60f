"""hbkernels: Hessian eigenpairs, per-sample gradient alignment and decision-boundary measures.

The compiled extension (``hbkernels._C``) registers the ops under ``torch.ops.hbkernels``; at
import, hbkernels checks that it was built against the running torch.
"""

from __future__ import annotations

__version__ = "0.2.0"

from .ops import (  # noqa: E402  (loads and checks the extension first)
    cosine_alignment,
    cosine_from_dots,
    ghost_alignment,
    ghost_dots,
    ghost_gram,
    ghost_products,
    ghost_sq_norms,
    gram,
)
from .params import flatten_params, num_params, unflatten_like  # noqa: E402
from .lanczos import LanczosResult, lanczos  # noqa: E402
from .operators import LinearOperator  # noqa: E402
from .hvp import LinearChain  # noqa: E402
from .hessian import (  # noqa: E402
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    SpectralDensity,
    TraceResult,
    eigs,
    exact_ggn,
    exact_hessian,
    ggn_eigs,
    hessian_eigs,
    hessian_spectrum,
    hessian_trace,
    spectral_density,
)
from .persample import (  # noqa: E402
    EmpiricalFisherOperator,
    PerSampleProducts,
    fisher_eigs,
    gradient_alignment,
    gradient_covariance_eigs,
    gradient_gram,
    gradient_norms,
    per_sample_grads,
    per_sample_products,
)

__all__ = [
    "__version__",
    "gram",
    "cosine_alignment",
    "ghost_gram",
    "ghost_dots",
    "ghost_sq_norms",
    "ghost_products",
    "ghost_alignment",
    "cosine_from_dots",
    "flatten_params",
    "unflatten_like",
    "num_params",
    "per_sample_grads",
    "gradient_norms",
    "gradient_gram",
    "gradient_alignment",
    "gradient_covariance_eigs",
    "per_sample_products",
    "PerSampleProducts",
    "EmpiricalFisherOperator",
    "fisher_eigs",
    "lanczos",
    "LanczosResult",
    "LinearOperator",
    "LinearChain",
    "HessianOperator",
    "GGNOperator",
    "MatrixOperator",
    "eigs",
    "hessian_eigs",
    "ggn_eigs",
    "exact_hessian",
    "exact_ggn",
    "hessian_spectrum",
    "hessian_trace",
    "spectral_density",
    "TraceResult",
    "SpectralDensity",
]
