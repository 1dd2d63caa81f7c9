// pybind11 entry point of gemext._C (filled in by the kernel work).
#include <pybind11/pybind11.h>
namespace py = pybind11;
PYBIND11_MODULE(_C, m) {
  m.attr("version") = GEMEXT_VERSION;
#ifdef GEMEXT_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
#ifdef GEMEXT_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
