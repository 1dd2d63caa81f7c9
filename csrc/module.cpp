// pybind11 entry point of gemext._C. Deliberately no libtorch: every function takes raw data
// pointers (tensor.data_ptr()), numels, a dtype code (0 float32, 1 float64), a device code
// (0 CPU, 1 CUDA), the CUDA stream handle and the CPU thread count. gemext/ops.py validates
// everything before calling in; here only the structural invariants are re-checked.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "gemext_launch.h"

namespace py = pybind11;
namespace gemext {
template <typename T> void cpu_math(int fn, const T* x, T* y, T* y2, int64_t n);
int max_threads();
}  // namespace gemext

namespace {
using namespace gemext;
using Ptrs = std::vector<uintptr_t>;
using Numels = std::vector<int64_t>;
// (dtype code, device code, CUDA stream handle, CPU threads)
using Exec = std::tuple<int, int, uintptr_t, int>;

template <class Op> void run(const Op& op, const Exec& ex, std::vector<Ptrs> lists, Numels numels,
                             Rng rng = {0, 0}, uintptr_t reduce_out = 0, const Numels& starts = {}) {
  const Table table(std::move(lists), std::move(numels), starts);
  void* out = reinterpret_cast<void*>(reduce_out);
  py::gil_scoped_release nogil;
  if (std::get<1>(ex) == 0) {
    cpu_run(op, table, rng, std::max(1, std::get<3>(ex)), out);
  } else {
#ifdef GEMEXT_WITH_CUDA
    cuda_run(op, table, rng, std::get<2>(ex), out);
#else
    throw std::invalid_argument("gemext was built without CUDA kernels (GEMEXT_CUDA=0 or no nvcc)");
#endif
  }
}

// Calls f(T{}) with T the C++ type of the dtype code.
template <class F> void with_dtype(const Exec& ex, F&& f) {
  switch (std::get<0>(ex)) {
    case 0: f(float{}); break;
    case 1: f(double{}); break;
    default: throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64)");
  }
}

std::vector<Ptrs> concat(std::initializer_list<const Ptrs*> lists) {
  std::vector<Ptrs> out;
  for (const Ptrs* l : lists) out.push_back(*l);
  return out;
}
}  // namespace

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
  m.attr("max_threads") = gemext::max_threads();

  m.def("sample", [](const Exec& ex, const Ptrs& mu, const Ptrs& rho, const Ptrs& theta,
                     const Numels& n, uint64_t seed, uint64_t offset, const Numels& starts) {
    with_dtype(ex, [&](auto tag) {
      run(SampleOp<decltype(tag)>{}, ex, concat({&mu, &rho, &theta}), n, Rng{seed, offset}, 0, starts);
    });
  }, "theta = mu + exp(rho) * eps (starts: per-tensor global index of element 0, empty = cumulative)");

  m.def("reparam_grad", [](const Exec& ex, const Ptrs& g, const Ptrs& rho, const Ptrs& drho,
                           const Numels& n, uint64_t seed, uint64_t offset, const Numels& starts) {
    with_dtype(ex, [&](auto tag) {
      run(ReparamGradOp<decltype(tag)>{}, ex, concat({&g, &rho, &drho}), n, Rng{seed, offset}, 0, starts);
    });
  }, "drho = g * eps * exp(rho)");

  m.def("elbo_backward", [](const Exec& ex, const Ptrs& g, const Ptrs& mu, const Ptrs& rho,
                            const Ptrs& mu0, const Ptrs& rho0, const Ptrs& dmu, const Ptrs& drho,
                            const Numels& n, uint64_t seed, uint64_t offset, double beta,
                            const Numels& starts) {
    with_dtype(ex, [&](auto tag) {
      using T = decltype(tag);
      ElboBackwardOp<T> op;
      op.beta = static_cast<T>(beta);
      run(op, ex, concat({&g, &mu, &rho, &mu0, &rho0, &dmu, &drho}), n, Rng{seed, offset}, 0, starts);
    });
  }, "gradients of -ELBO wrt mu and rho into dmu, drho");

  m.def("gaussian_kl", [](const Exec& ex, const Ptrs& mu, const Ptrs& rho, const Ptrs& mu0,
                          const Ptrs& rho0, const Numels& n, uintptr_t out) {
    with_dtype(ex, [&](auto tag) {
      run(KlOp<decltype(tag)>{}, ex, concat({&mu, &rho, &mu0, &rho0}), n, Rng{0, 0}, out);
    });
  }, "sum of KL(q||p) over all elements into *out");

  m.def("gaussian_kl_backward", [](const Exec& ex, const Ptrs& mu, const Ptrs& rho,
                                   const Ptrs& mu0, const Ptrs& rho0, const Ptrs& dmu,
                                   const Ptrs& drho, const Ptrs& dmu0, const Ptrs& drho0,
                                   const Numels& n, uintptr_t gout) {
    with_dtype(ex, [&](auto tag) {
      using T = decltype(tag);
      KlBackwardOp<T> op;
      op.gout = reinterpret_cast<const T*>(gout);
      run(op, ex, concat({&mu, &rho, &mu0, &rho0, &dmu, &drho, &dmu0, &drho0}), n);
    });
  }, "gradients of the KL sum times *gout");

  // in: mu0, rho0, mu_a, rho_a, [mu_b, rho_b] (empty lists: GEM-BML), out: g_mu0, g_rho0.
  // accumulate: out += weight * g, else out = weight * g. ntasks > 0 (accumulate only): the
  // posterior lists are [ntasks, n] stacks over priors of n elements (n in `n`), and
  // out += weight * sum over t of g(prior, posterior_t), summed in t order in the dtype.
  m.def("gem_grad", [](const Exec& ex, const Ptrs& mu0, const Ptrs& rho0, const Ptrs& mua,
                       const Ptrs& rhoa, const Ptrs& mub, const Ptrs& rhob, const Ptrs& gmu,
                       const Ptrs& grho, const Numels& n, double weight, bool accumulate,
                       int64_t ntasks) {
    const bool plus = !mub.empty() || !rhob.empty();
    if (ntasks < 0) throw std::invalid_argument("ntasks must be >= 0");
    if (ntasks > 0 && !accumulate)
      throw std::invalid_argument("a task sum (ntasks > 0) needs accumulate=true");
    with_dtype(ex, [&](auto tag) {
      using T = decltype(tag);
      auto go = [&](auto op, std::vector<Ptrs> lists) {
        op.weight = static_cast<T>(weight);
        run(op, ex, std::move(lists), n);
      };
      auto go_tasks = [&](auto op, std::vector<Ptrs> lists) {
        op.ntasks = ntasks;
        go(op, std::move(lists));
      };
      if (plus && ntasks > 0)
        go_tasks(GemTaskSumOp<T, true>{}, concat({&mu0, &rho0, &mua, &rhoa, &mub, &rhob, &gmu, &grho, &gmu, &grho}));
      else if (ntasks > 0)
        go_tasks(GemTaskSumOp<T, false>{}, concat({&mu0, &rho0, &mua, &rhoa, &gmu, &grho, &gmu, &grho}));
      else if (plus && accumulate)
        go(GemOp<T, true, true>{}, concat({&mu0, &rho0, &mua, &rhoa, &mub, &rhob, &gmu, &grho, &gmu, &grho}));
      else if (plus)
        go(GemOp<T, true, false>{}, concat({&mu0, &rho0, &mua, &rhoa, &mub, &rhob, &gmu, &grho}));
      else if (accumulate)
        go(GemOp<T, false, true>{}, concat({&mu0, &rho0, &mua, &rhoa, &gmu, &grho, &gmu, &grho}));
      else
        go(GemOp<T, false, false>{}, concat({&mu0, &rho0, &mua, &rhoa, &gmu, &grho}));
    });
  }, "Gradient-EM ascent direction (GEM-BML, or GEM-BML+ with mu_b/rho_b), optionally summed "
     "over a leading task dimension of the posterior (ntasks > 0)");

  // in: mu, rho, h, grad, [curv], mu0, rho0, [corr] (empty lists: absent); mu, rho, h are
  // updated in place. Without curv, eps is drawn as sample() draws it for (seed, offset, starts).
  m.def("von_step", [](const Exec& ex, const Ptrs& mu, const Ptrs& rho, const Ptrs& h,
                       const Ptrs& g, const Ptrs& curv, const Ptrs& mu0, const Ptrs& rho0,
                       const Ptrs& corr, const Numels& n, uint64_t seed, uint64_t offset,
                       double lr, double beta, double h_decay, double damping,
                       const Numels& starts) {
    with_dtype(ex, [&](auto tag) {
      using T = decltype(tag);
      auto go = [&](auto op) {
        op.lr = static_cast<T>(lr);
        op.beta = static_cast<T>(beta);
        op.keep = static_cast<T>(1.0 - h_decay);
        op.decay = static_cast<T>(h_decay);
        op.damping = static_cast<T>(damping);
        std::vector<Ptrs> lists = concat({&mu, &rho, &h, &g});
        if (!curv.empty()) lists.push_back(curv);
        lists.push_back(mu0);
        lists.push_back(rho0);
        if (!corr.empty()) lists.push_back(corr);
        for (const Ptrs* out : {&mu, &rho, &h}) lists.push_back(*out);
        run(op, ex, std::move(lists), n, Rng{seed, offset}, 0, starts);
      };
      if (!curv.empty() && !corr.empty()) go(VonStepOp<T, true, true>{});
      else if (!curv.empty()) go(VonStepOp<T, true, false>{});
      else if (!corr.empty()) go(VonStepOp<T, false, true>{});
      else go(VonStepOp<T, false, false>{});
    });
  }, "one variational online Newton step on (mu, rho, h), in place");

  // Test hooks (CPU): the shared maths on n values. fn: 0 exp, 1 log, 2 sincos_turns (y=sin, y2=cos).
  m.def("math", [](int fn, int dtype, uintptr_t x, uintptr_t y, uintptr_t y2, int64_t n) {
    if (dtype == 0)
      cpu_math<float>(fn, reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y),
                      reinterpret_cast<float*>(y2), n);
    else
      cpu_math<double>(fn, reinterpret_cast<const double*>(x), reinterpret_cast<double*>(y),
                       reinterpret_cast<double*>(y2), n);
  });
  m.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
    uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
    philox4x32_10(c, key[0], key[1]);
    return std::array<uint32_t, 4>{c[0], c[1], c[2], c[3]};
  });
}
