// Multi-tensor addressing shared by the CPU and CUDA drivers, and the driver entry points.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemext_math.h"

namespace gemext {

// One call's tensors: ptrs[k][t] is pointer list k (the op's inputs, then outputs) of tensor t.
// The global element index of tensor t starts at gstart[t]: by default the sum of the previous
// numels, or the caller's `starts` (a shard of a larger batch draws the ε its elements would
// draw in the full concatenation; starts need not be multiples of 4). That index, not the
// tensor's, keys the random stream.
struct Table {
  std::vector<std::vector<uintptr_t>> ptrs;
  std::vector<int64_t> numels;
  std::vector<int64_t> gstart;

  Table(std::vector<std::vector<uintptr_t>> p, std::vector<int64_t> n,
        const std::vector<int64_t>& starts = {})
      : ptrs(std::move(p)), numels(std::move(n)), gstart(numels.size()) {
    if (!starts.empty() && starts.size() != numels.size())
      throw std::invalid_argument("starts must hold one index per tensor");
    int64_t g = 0;
    for (size_t t = 0; t < numels.size(); ++t) {
      if (numels[t] < 0) throw std::invalid_argument("negative numel");
      if (!starts.empty() && (starts[t] < 0 || starts[t] > INT64_MAX - numels[t]))
        throw std::invalid_argument("start index out of range");
      gstart[t] = starts.empty() ? g : starts[t];
      g += numels[t];
    }
    for (const auto& list : ptrs)
      if (list.size() != numels.size())
        throw std::invalid_argument("pointer list length differs from the number of tensors");
  }
  size_t ntensors() const { return numels.size(); }
  int64_t total() const {
    int64_t n = 0;
    for (int64_t k : numels) n += k;
    return n;
  }
};

// Drivers. `reduce_out` (REDUCE ops only) points to one element of the op's dtype on the
// op's device; the double-precision sum is written there. For TASKS ops, numels are those
// of the unstacked tensors; a stacked input of tensor t holds op.ntasks slices of numels[t].
template <class Op> void cpu_run(Op op, const Table& t, Rng rng, int nthreads, void* reduce_out);
template <class Op> void cuda_run(Op op, const Table& t, Rng rng, uintptr_t stream, void* reduce_out);

// Every op instantiated by the drivers (cpu_ops.cpp, cuda_ops.cu).
#define GEMEXT_FOR_EACH_OP_T(X, T)                                                            \
  X(SampleOp<T>) X(ReparamGradOp<T>) X(ElboBackwardOp<T>) X(KlOp<T>) X(KlBackwardOp<T>)       \
  X(GemOp<T, false, false>) X(GemOp<T, true, false>) X(GemOp<T, false, true>)                 \
  X(GemOp<T, true, true>) X(GemTaskSumOp<T, false>) X(GemTaskSumOp<T, true>)                 \
  X(VonStepOp<T, false, false>) X(VonStepOp<T, true, false>) X(VonStepOp<T, false, true>)     \
  X(VonStepOp<T, true, true>)
#define GEMEXT_FOR_EACH_OP(X) GEMEXT_FOR_EACH_OP_T(X, float) GEMEXT_FOR_EACH_OP_T(X, double)

}  // namespace gemext
