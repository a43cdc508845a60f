// Operator schemas (one place) and their registrations per dispatch key. The kernels are
// device-generic ATen code, so CPU and CUDA register the same functions.
#include <torch/library.h>

#include "hbk/alignment.h"
#include "hbk/gram.h"

TORCH_LIBRARY(hbkernels, m) {
  m.def("gram(Tensor grads) -> Tensor");
  m.def("ghost_gram(Tensor[] inputs, Tensor[] output_grads, bool[] has_bias) -> Tensor");
  m.def("cosine_alignment(Tensor grads, Tensor vectors) -> Tensor");
  m.def(
      "ghost_dots(Tensor[] inputs, Tensor[] output_grads, Tensor[] weight_vectors, "
      "Tensor?[] bias_vectors) -> Tensor");
  m.def("ghost_sq_norms(Tensor[] inputs, Tensor[] output_grads, bool[] has_bias) -> Tensor");
  m.def(
      "ghost_alignment(Tensor[] inputs, Tensor[] output_grads, Tensor[] weight_vectors, "
      "Tensor?[] bias_vectors) -> Tensor");
  m.def("cosine_from_dots(Tensor dots, Tensor grad_sq_norms, Tensor vector_sq_norms) -> Tensor");
}

#define HBK_REGISTER_KERNELS(m)                           \
  m.impl("gram", &hbk::gram);                             \
  m.impl("ghost_gram", &hbk::ghost_gram);                 \
  m.impl("cosine_alignment", &hbk::cosine_alignment);     \
  m.impl("ghost_dots", &hbk::ghost_dots);                 \
  m.impl("ghost_sq_norms", &hbk::ghost_sq_norms);         \
  m.impl("ghost_alignment", &hbk::ghost_alignment);       \
  m.impl("cosine_from_dots", &hbk::cosine_from_dots);

TORCH_LIBRARY_IMPL(hbkernels, CPU, m) { HBK_REGISTER_KERNELS(m) }
TORCH_LIBRARY_IMPL(hbkernels, CUDA, m) { HBK_REGISTER_KERNELS(m) }
