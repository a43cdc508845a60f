// Operator schemas (one place) and their registrations per dispatch key. The kernels are
// device-generic ATen code, so CPU and CUDA register the same functions.
//
// Autograd: gram, cosine_alignment and cosine_from_dots have formulas, registered from Python
// (hbkernels/_opdefs.py, torch.library.register_autograd). The ghost ops have none: their
// Autograd kernel below refuses inputs that require grad with a clear error (instead of
// torch's generic warning and no gradient, or an error about mm's out= argument).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <string>

#include "hbk/alignment.h"
#include "hbk/gram.h"

namespace hbk {
namespace {

bool requires_grad(const c10::IValue& v) {
  return v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad();
}

// Boxed Autograd kernel of a non-differentiable op: refuse any argument (or list entry) that
// requires grad while grad mode is on, then run the op below autograd.
void refuse_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                     torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const auto first = stack->end() - static_cast<std::ptrdiff_t>(args.size());
    for (size_t a = 0; a < args.size(); ++a) {
      const c10::IValue& v = *(first + static_cast<std::ptrdiff_t>(a));
      std::string where;
      if (requires_grad(v)) {
        where = args[a].name();
      } else if (v.isList()) {
        const auto items = v.toListRef();
        for (size_t i = 0; i < items.size() && where.empty(); ++i)
          if (requires_grad(items[i])) where = args[a].name() + "[" + std::to_string(i) + "]";
      }
      TORCH_CHECK_NOT_IMPLEMENTED(
          where.empty(), "hbk.", op.schema().name().substr(op.schema().name().find("::") + 2),
          " is not differentiable (no autograd formula): expected inputs that do not require "
          "grad (detach them, or call it under torch.no_grad()), got requires_grad=True in ",
          where);
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace
}  // namespace hbk

TORCH_LIBRARY(hbkernels, m) {
  m.def("gram(Tensor grads) -> Tensor");
  m.def("ghost_gram(Tensor[] inputs, Tensor[] output_grads, bool[] has_bias) -> Tensor");
  m.def("cosine_alignment(Tensor grads, Tensor vectors) -> Tensor");
  m.def(
      "ghost_dots(Tensor[] inputs, Tensor[] output_grads, Tensor[] weight_vectors, "
      "Tensor?[] bias_vectors) -> Tensor");
  m.def("ghost_sq_norms(Tensor[] inputs, Tensor[] output_grads, bool[] has_bias) -> Tensor");
  m.def(
      "ghost_products(Tensor[] inputs, Tensor[] output_grads, bool[] has_bias, "
      "Tensor[] weight_vectors, Tensor[] bias_vectors) -> (Tensor dots, Tensor sq_norms)");
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
  m.impl("ghost_products", &hbk::ghost_products);         \
  m.impl("ghost_alignment", &hbk::ghost_alignment);       \
  m.impl("cosine_from_dots", &hbk::cosine_from_dots);

TORCH_LIBRARY_IMPL(hbkernels, CPU, m) { HBK_REGISTER_KERNELS(m) }
TORCH_LIBRARY_IMPL(hbkernels, CUDA, m) { HBK_REGISTER_KERNELS(m) }

TORCH_LIBRARY_IMPL(hbkernels, Autograd, m) {
  for (const char* op :
       {"ghost_gram", "ghost_dots", "ghost_sq_norms", "ghost_products", "ghost_alignment"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&hbk::refuse_autograd>());
}
