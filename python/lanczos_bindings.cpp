// pybind11 glue for the Lanczos driver (issue 3).
#include <pybind11/pybind11.h>

namespace hbk::python {
void init_lanczos(pybind11::module_& m) {}
}  // namespace hbk::python
