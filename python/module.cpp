// The hbkernels._C module: build info and the bindings of each area (one init_<area> per
// file). Loading it also runs the TORCH_LIBRARY registrations of csrc/ops.cpp.
#include <pybind11/pybind11.h>

namespace hbk::python {
void init_lanczos(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hbkernels C++ extension (ops are under torch.ops.hbkernels)";
  m.attr("TORCH_VERSION") = HBK_TORCH_VERSION;
#ifdef _OPENMP
  m.attr("OPENMP") = true;
#else
  m.attr("OPENMP") = false;
#endif
  hbk::python::init_lanczos(m);
}
