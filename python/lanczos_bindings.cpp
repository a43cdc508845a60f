// pybind11 glue for the Lanczos driver: turns a Python callable into the driver's operator.
//
// Discipline (as in faiss' python_callbacks): the driver runs with the GIL released; the
// adapter takes the GIL only around the Python call; a Python exception raised by the
// callable becomes py::error_already_set, travels through the C++ driver untouched and is
// restored unchanged (same type, message and traceback) when it reaches pybind11. Pending
// signals (Ctrl-C) are checked after every operator call.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/util/Exception.h>

#include "hbk/lanczos.h"

#include <string>

namespace py = pybind11;

namespace hbk::python {
namespace {

// The callable's result as an at::Tensor (TypeError, in the public name, otherwise).
at::Tensor unpack_result(const py::object& r, const char* fn) {
  if (!THPVariable_Check(r.ptr())) {
    throw py::type_error(std::string(fn) + ": expected matvec to return a torch.Tensor, got " +
                         std::string(py::str(py::type::of(r).attr("__name__"))));
  }
  return THPVariable_Unpack(r.ptr());
}

BlockMatvec make_matvec(const py::object& fn, const char* name) {
  return [&fn, name](const at::Tensor& x) -> at::Tensor {
    py::gil_scoped_acquire gil;
    py::object r = fn(x);  // a Python exception propagates as py::error_already_set
    at::Tensor y = unpack_result(r, name);
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    return y;
  };
}

LanczosMonitor make_monitor(const py::object& progress) {
  return [&progress](const LanczosProgress& p) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!progress.is_none()) progress(p.num_matvecs, p.num_converged, p.num_restarts);
  };
}

// Runs `body` with the GIL released and turns c10 errors into the Python exceptions the
// TORCH_CHECK_* macros promise (ValueError, TypeError, RuntimeError) without C++ backtraces.
template <typename F>
auto run_without_gil(F&& body) -> decltype(body()) {
  try {
    py::gil_scoped_release release;
    return body();
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

py::dict lanczos(const py::object& matvec, const at::Tensor& start, int64_t k,
                 const std::string& which, double tol, int64_t ncv, int64_t max_matvecs,
                 int64_t block_size, bool store_products, bool reorth_twice, uint64_t seed,
                 bool verify, const py::object& progress) {
  LanczosOptions opts;
  opts.k = k;
  opts.which = parse_which(which);
  opts.tol = tol;
  opts.ncv = ncv;
  opts.max_matvecs = max_matvecs;
  opts.block_size = block_size;
  opts.store_products = store_products;
  opts.seed = seed;
  opts.reorth_twice = reorth_twice;
  opts.verify = verify;
  BlockMatvec op = make_matvec(matvec, "hbk.lanczos");
  LanczosMonitor monitor = make_monitor(progress);
  LanczosOutput out =
      run_without_gil([&] { return thick_restart_lanczos(op, start, opts, monitor); });
  py::dict d;
  d["eigenvalues"] = out.eigenvalues;
  d["eigenvectors"] = out.eigenvectors;
  d["residuals"] = out.residuals;
  d["converged"] = out.converged;
  d["num_matvecs"] = out.num_matvecs;
  d["num_restarts"] = out.num_restarts;
  d["reorth_passes"] = out.reorth_passes;
  d["matvec_seconds"] = out.matvec_seconds;
  d["total_seconds"] = out.total_seconds;
  d["verify_status"] = static_cast<int>(out.verify_status);
  d["num_probes"] = out.num_probes;
  d["probe_found"] = out.probe_found;
  d["main_matvecs"] = out.main_matvecs;
  py::dict prof;
  prof["orth_seconds"] = out.orth_seconds;
  prof["solve_seconds"] = out.solve_seconds;
  prof["restart_seconds"] = out.restart_seconds;
  prof["finish_seconds"] = out.finish_seconds;
  d["profile"] = prof;
  return d;
}

py::tuple lanczos_tridiagonal_py(const py::object& matvec, const at::Tensor& start,
                                 int64_t steps, const py::object& progress) {
  BlockMatvec op = make_matvec(matvec, "hbk.spectral_density");
  LanczosMonitor monitor = make_monitor(progress);
  auto ab = run_without_gil([&] { return lanczos_tridiagonal(op, start, steps, monitor); });
  return py::make_tuple(ab.first, ab.second);
}

}  // namespace

void init_lanczos(py::module_& m) {
  m.def("lanczos", &lanczos, py::arg("matvec"), py::arg("start"), py::arg("k"),
        py::arg("which"), py::arg("tol"), py::arg("ncv"), py::arg("max_matvecs"),
        py::arg("block_size"), py::arg("store_products"), py::arg("reorth_twice"),
        py::arg("seed"), py::arg("verify"), py::arg("progress"),
        "Thick-restart block Lanczos (C++ driver); use hbkernels.lanczos instead.");
  m.def("lanczos_tridiagonal", &lanczos_tridiagonal_py, py::arg("matvec"), py::arg("start"),
        py::arg("steps"), py::arg("progress"),
        "Independent Lanczos recurrences per column (alpha (b, m), beta (b, m-1)).");
}

}  // namespace hbk::python
