// CUDA driver: one launch covers every tensor of a list (multi-tensor apply). The tensor table
// (pointers, numels, global starts, first chunk of each tensor) travels as a kernel parameter:
// CUDA >= 12.1 on sm_70+ allows 32764 bytes of parameters, enough for ~270 tensors per launch;
// longer lists take several launches. Each block owns one chunk of kChunk elements of one
// tensor; each thread owns whole Philox groups (4 consecutive global elements, one Philox call)
// and uses 16-byte vector loads/stores when the group is aligned. The KL reduction writes one
// double partial per chunk (fixed-order tree in the block), then a single block sums the
// partials in a fixed order: the result does not depend on scheduling. TASKS ops (a sum over a
// leading task dimension of some inputs) take chunks of one group per thread, and each thread
// sums its elements' terms over t = 0, 1, ... in order, as the CPU does: bitwise the same.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "gemext_launch.h"

namespace gemext {
namespace {

constexpr int64_t kChunk = 1 << 14;
constexpr int kThreads = 256;
constexpr int kReduceThreads = 512;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("gemext CUDA ") + what + ": " + cudaGetErrorString(e));
}

// Elements per block: TASKS ops loop over the tasks in each thread, so one group per thread.
template <class Op> constexpr int64_t chunk_elems() { return Op::TASKS ? int64_t(4) * kThreads : kChunk; }

template <int NP> struct KTable {
  static constexpr int MAXT = (28 * 1024) / (NP * 8 + 25);
  int ntensors;
  int64_t chunk_base;              // index of this launch's first chunk among all partials
  int64_t cstart[MAXT + 1];        // first chunk (within this launch) of each tensor
  int64_t numel[MAXT];
  int64_t gstart[MAXT];
  const void* ptr[MAXT][NP];
  unsigned char aligned[MAXT];     // every pointer 16-byte aligned and gstart % 4 == 0
                                   // (TASKS ops: also numel % 4 == 0, so every task slice is)
};

template <typename T> __device__ __forceinline__ void load4(const T* p, T (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  } else {
    const double2 a = reinterpret_cast<const double2*>(p)[0];
    const double2 b = reinterpret_cast<const double2*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
  }
}
template <typename T> __device__ __forceinline__ void store4(T* p, const T (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
  }
}

// The 4 values of a group at local indices j0 .. j0+3 (out-of-range ones 0): one vector load
// when `full` (aligned and inside the chunk).
template <typename T>
__device__ __forceinline__ void load_group(const T* p, int64_t j0, int64_t len, bool full, T (&v)[4]) {
  if (full) {
    load4(p + j0, v);
  } else {
    for (int e = 0; e < 4; ++e) v[e] = (j0 + e >= 0 && j0 + e < len) ? p[j0 + e] : T(0);
  }
}

// TASKS ops: the 4 elements of one group, each summing its terms over t = 0 .. ntasks-1 in
// order (start/step/finish, as the CPU driver calls them); stacked inputs read at j + t·stride.
template <class Op, typename T = typename Op::scalar>
__device__ __forceinline__ void task_group(const Op& op, const T* const* in, T* const* out,
                                           int64_t j0, int64_t len, int64_t stride, bool full) {
  constexpr int NI = Op::NIN, NO = Op::NOUT, NA = Op::NACC;
  T v[NI][4], a[4][NA];
  for (int e = 0; e < 4; ++e) op.start(a[e]);
  for (int k = 0; k < NI; ++k)
    if (!Op::stacked(k)) load_group(in[k], j0, len, full, v[k]);
  for (int64_t task = 0; task < op.ntasks; ++task) {
    for (int k = 0; k < NI; ++k)
      if (Op::stacked(k)) load_group(in[k] + task * stride, j0, len, full, v[k]);
    for (int e = 0; e < 4; ++e) {
      T ve[NI];
      for (int k = 0; k < NI; ++k) ve[k] = v[k][e];
      op.step(ve, a[e]);
    }
  }
  T o[NO][4];
  for (int e = 0; e < 4; ++e) {
    T ve[NI], oe[NO];
    for (int k = 0; k < NI; ++k) ve[k] = Op::stacked(k) ? T(0) : v[k][e];
    op.finish(ve, a[e], oe);
    for (int k = 0; k < NO; ++k) o[k][e] = oe[k];
  }
  for (int k = 0; k < NO; ++k) {
    if (full) {
      store4(out[k] + j0, o[k]);
    } else {
      for (int e = 0; e < 4; ++e)
        if (j0 + e >= 0 && j0 + e < len) out[k][j0 + e] = o[k][e];
    }
  }
}

template <class Op, int NP = Op::NIN + Op::NOUT>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(Op op, const __grid_constant__ KTable<NP> tab, Rng rng, double* partials) {
  using T = typename Op::scalar;
  constexpr int NI = Op::NIN, NO = Op::NOUT > 0 ? Op::NOUT : 1;
  constexpr int64_t CH = chunk_elems<Op>();
  op.init();
  const int64_t c = blockIdx.x;
  int lo = 0, hi = tab.ntensors - 1;  // last tensor whose first chunk is <= c
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.cstart[mid] <= c) lo = mid; else hi = mid - 1;
  }
  const int t = lo;
  const int64_t begin = (c - tab.cstart[t]) * CH;
  const int64_t len = min(CH, tab.numel[t] - begin);
  const int64_t g_begin = tab.gstart[t] + begin;  // global index of the chunk's element 0
  const T* in[Op::NIN];
  T* out[NO];
  for (int k = 0; k < NI; ++k) in[k] = static_cast<const T*>(tab.ptr[t][k]) + begin;
  for (int k = 0; k < Op::NOUT; ++k) out[k] = static_cast<T*>(const_cast<void*>(tab.ptr[t][NI + k])) + begin;
  const bool vec = tab.aligned[t];

  double acc = 0;
  const int64_t first_group = g_begin >> 2, end_group = (g_begin + len + 3) >> 2;
  for (int64_t grp = first_group + threadIdx.x; grp < end_group; grp += blockDim.x) {
    const int64_t j0 = 4 * grp - g_begin;  // local index of the group's first element
    if constexpr (Op::TASKS) {
      task_group(op, in, out, j0, len, tab.numel[t], vec && j0 + 4 <= len);
    } else {
      T eps[4] = {T(0), T(0), T(0), T(0)};
      if constexpr (Op::EPS) normals4(rng, static_cast<uint64_t>(grp), eps);
      if (vec && j0 + 4 <= len) {  // aligned tensors have g_begin % 4 == 0, so j0 >= 0
        T v[NI][4], o[NO][4];
        for (int k = 0; k < NI; ++k) load4(in[k] + j0, v[k]);
        for (int e = 0; e < 4; ++e) {
          T ve[NI], oe[NO];
          for (int k = 0; k < NI; ++k) ve[k] = v[k][e];
          acc += static_cast<double>(op(ve, oe, eps[e]));
          for (int k = 0; k < NO; ++k) o[k][e] = oe[k];
        }
        for (int k = 0; k < Op::NOUT; ++k) store4(out[k] + j0, o[k]);
      } else {
        for (int e = 0; e < 4; ++e) {
          const int64_t j = j0 + e;
          if (j < 0 || j >= len) continue;
          T ve[NI], oe[NO];
          for (int k = 0; k < NI; ++k) ve[k] = in[k][j];
          acc += static_cast<double>(op(ve, oe, eps[e]));
          for (int k = 0; k < Op::NOUT; ++k) out[k][j] = oe[k];
        }
      }
    }
  }
  if constexpr (Op::REDUCE) {
    __shared__ double sh[kThreads];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[tab.chunk_base + c] = sh[0];
  }
}

template <typename T> __global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const double* partials, int64_t n, T* out) {
  __shared__ double sh[kReduceThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) acc += partials[i];
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<T>(sh[0]);
}

}  // namespace

template <class Op> void cuda_run(Op op, const Table& t, Rng rng, uintptr_t stream, void* reduce_out) {
  using T = typename Op::scalar;
  constexpr int NP = Op::NIN + Op::NOUT;
  using Tab = KTable<NP>;
  if (t.ptrs.size() != static_cast<size_t>(NP))
    throw std::invalid_argument("wrong number of pointer lists for this op");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  constexpr int64_t CH = chunk_elems<Op>();
  int64_t total_chunks = 0;
  for (int64_t n : t.numels) total_chunks += (n + CH - 1) / CH;
  double* partials = nullptr;
  if (Op::REDUCE && total_chunks > 0)
    check(cudaMallocAsync(reinterpret_cast<void**>(&partials), total_chunks * sizeof(double), s),
          "cudaMallocAsync");

  Tab tab;
  int64_t chunk_base = 0;
  size_t i = 0;
  while (i < t.ntensors()) {  // one launch per MAXT non-empty tensors
    tab.ntensors = 0;
    tab.chunk_base = chunk_base;
    int64_t chunks = 0;
    for (; i < t.ntensors() && tab.ntensors < Tab::MAXT; ++i) {
      if (t.numels[i] == 0) continue;
      const int k = tab.ntensors++;
      tab.cstart[k] = chunks;
      tab.numel[k] = t.numels[i];
      tab.gstart[k] = t.gstart[i];
      bool aligned = t.gstart[i] % 4 == 0 && (!Op::TASKS || t.numels[i] % 4 == 0);
      for (int p = 0; p < NP; ++p) {
        tab.ptr[k][p] = reinterpret_cast<const void*>(t.ptrs[p][i]);
        aligned = aligned && t.ptrs[p][i] % 16 == 0;
      }
      tab.aligned[k] = aligned;
      chunks += (t.numels[i] + CH - 1) / CH;
    }
    tab.cstart[tab.ntensors] = chunks;
    if (chunks > 0) {
      multi_tensor_kernel<Op><<<static_cast<unsigned>(chunks), kThreads, 0, s>>>(op, tab, rng, partials);
      check(cudaGetLastError(), "kernel launch");
    }
    chunk_base += chunks;
  }
  if constexpr (Op::REDUCE) {
    sum_partials_kernel<T><<<1, kReduceThreads, 0, s>>>(partials, total_chunks, static_cast<T*>(reduce_out));
    check(cudaGetLastError(), "reduce launch");
    if (partials) check(cudaFreeAsync(partials, s), "cudaFreeAsync");
  }
}

#define GEMEXT_INSTANTIATE_CUDA(...) \
  template void cuda_run<__VA_ARGS__>(__VA_ARGS__, const Table&, Rng, uintptr_t, void*);
GEMEXT_FOR_EACH_OP(GEMEXT_INSTANTIATE_CUDA)

}  // namespace gemext
