// CPU driver: the flat work of all tensors is cut into fixed chunks, chunks are split over
// OpenMP threads (dynamically: on a shared machine a descheduled thread must not hold up the
// others), and each chunk runs the op's element function in vectorised loops over blocks.
// Ops with ε generate it per small step of Philox groups right before using it
// (cpu_kernels.h), with AVX-512 where the CPU has it. Fixed chunks make the reduction
// (per-chunk double partials summed in chunk order) independent of the thread count.
// TASKS ops (a sum over a leading task dimension) run each block task by task, t = 0, 1, ...,
// with the running sums of the block's elements in an L1-resident buffer: every element's sum
// is formed in the same order whatever the chunking and thread count.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gemext_launch.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gemext {
namespace {

constexpr int64_t kChunk = 1 << 15;       // elements per unit of parallel work
constexpr int64_t kBlock = 1024;          // elements per block of the generic loops
constexpr int64_t kParallelMin = 1 << 16;  // below this, threads cost more than they save

struct Chunk {
  int64_t tensor, begin, len;
};

std::vector<Chunk> make_chunks(const Table& t, int64_t size) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < t.ntensors(); ++i)
    for (int64_t b = 0; b < t.numels[i]; b += size)
      chunks.push_back({static_cast<int64_t>(i), b, std::min(size, t.numels[i] - b)});
  return chunks;
}

// Element-steps per element: ntasks for TASKS ops (each element sums that many terms), else 1.
template <class Op> int64_t steps_per_element(const Op& op) {
  if constexpr (Op::TASKS) return op.ntasks;
  else return 1;
}

// Element loops carry no dependencies between iterations (outputs may only alias inputs
// exactly); tell the vectoriser so instead of letting it version loops on 10 pointers.
// (`omp simd` would do too, but it keeps the small per-element value arrays in memory.)
#if defined(__clang__)
#define GEMEXT_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define GEMEXT_IVDEP _Pragma("GCC ivdep")
#else
#define GEMEXT_IVDEP
#endif

#define GEMEXT_INLINE inline __attribute__((always_inline))
#define GEMEXT_LAMBDA_INLINE __attribute__((always_inline))
constexpr int64_t kGroupPad = 16;  // the widest Philox step (AVX-512: 16 groups)
constexpr int64_t kMaxGroups = kBlock / 4 + kGroupPad;  // groups of a block, rounded up

}  // namespace

// The element loops, once per instruction set (see cpu_kernels.h): isa_base for the build's
// flags (AVX2 + FMA by default, baseline x86-64 with GEMEXT_PORTABLE) ...
namespace isa_base {
#define GEMEXT_KERNELS_AVX512 0
#include "cpu_kernels.h"
#undef GEMEXT_KERNELS_AVX512
}  // namespace isa_base

// ... and for the ops with ε an AVX-512 (F, VL, BW, DQ) variant, chosen at run time where the
// CPU and OS support it: twice the vector width on the same operations, so the same bits. The
// module itself still needs only AVX2. -DGEMEXT_NO_AVX512 leaves the variant out.
#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(GEMEXT_NO_AVX512)
#define GEMEXT_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
namespace isa_avx512 {
#define GEMEXT_KERNELS_AVX512 1
#include "cpu_kernels.h"
#undef GEMEXT_KERNELS_AVX512
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

namespace {

// Whether the ε ops run the AVX-512 loops: the CPU (and OS) support them, and the environment
// variable GEMEXT_CPU_ISA is not "avx2" (read once; for testing both paths on one machine).
bool use_avx512() {
#ifdef GEMEXT_HAVE_AVX512
  static const bool yes = [] {
    const char* isa = std::getenv("GEMEXT_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "avx2") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return yes;
#else
  return false;
#endif
}

using isa_base::run_block;

// One block of n elements of a TASKS op: the running sums of the n elements in acc (NACC rows
// of kBlock), then one pass per task t = 0 .. ntasks-1 in order, reading the stacked inputs at
// j + t·stride, then finish() into the outputs.
template <class Op, typename T = typename Op::scalar>
void run_task_block(const Op& op, const T* const (&in)[Op::NIN], T* const* out, int64_t n,
                    int64_t stride, T* acc) {
  constexpr int NI = Op::NIN, NO = Op::NOUT, NA = Op::NACC;
  GEMEXT_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    T a[NA];
    op.start(a);
    GEMEXT_UNROLL
    for (int m = 0; m < NA; ++m) acc[m * kBlock + j] = a[m];
  }
  for (int64_t task = 0; task < op.ntasks; ++task) {
    const T* inb[NI];
    for (int k = 0; k < NI; ++k) inb[k] = in[k] + (Op::stacked(k) ? task * stride : 0);
    GEMEXT_IVDEP
    for (int64_t j = 0; j < n; ++j) {
      T v[NI], a[NA];
      GEMEXT_UNROLL
      for (int k = 0; k < NI; ++k) v[k] = inb[k][j];
      GEMEXT_UNROLL
      for (int m = 0; m < NA; ++m) a[m] = acc[m * kBlock + j];
      op.step(v, a);
      GEMEXT_UNROLL
      for (int m = 0; m < NA; ++m) acc[m * kBlock + j] = a[m];
    }
  }
  GEMEXT_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    T v[NI], a[NA], o[NO];
    GEMEXT_UNROLL
    for (int k = 0; k < NI; ++k) v[k] = Op::stacked(k) ? T(0) : in[k][j];
    GEMEXT_UNROLL
    for (int m = 0; m < NA; ++m) a[m] = acc[m * kBlock + j];
    op.finish(v, a, o);
    GEMEXT_UNROLL
    for (int k = 0; k < NO; ++k) out[k][j] = o[k];
  }
}

}  // namespace

template <class Op> void cpu_run(Op op, const Table& t, Rng rng, int nthreads, void* reduce_out) {
  using T = typename Op::scalar;
  constexpr int NI = Op::NIN, NO = Op::NOUT;
  if (t.ptrs.size() != static_cast<size_t>(NI + NO))
    throw std::invalid_argument("wrong number of pointer lists for this op");
  op.init();
  // a unit of parallel work is about kChunk element-steps (a TASKS op's element is ntasks)
  const int64_t steps = std::max<int64_t>(1, steps_per_element(op));
  const int64_t chunk = std::max(kBlock, (kChunk / steps) / kBlock * kBlock);
  const std::vector<Chunk> chunks = make_chunks(t, chunk);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(Op::REDUCE ? chunks.size() : 0);
  const bool parallel = t.total() * steps >= kParallelMin && nthreads > 1;
  const bool avx512 = Op::EPS && use_avx512();
  (void)parallel;
  (void)avx512;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    const T* in[NI];
    T* out[NO > 0 ? NO : 1] = {};
    for (int k = 0; k < NI; ++k) in[k] = reinterpret_cast<const T*>(t.ptrs[k][ch.tensor]) + ch.begin;
    for (int k = 0; k < NO; ++k) out[k] = reinterpret_cast<T*>(t.ptrs[NI + k][ch.tensor]) + ch.begin;
    // buf holds the terms of a reduction or a TASKS op's running sums
    alignas(64) T buf[(Op::EPS ? 0 : (Op::TASKS ? Op::NACC : 1) * kBlock) + 8];
    double acc = 0;
    if constexpr (Op::EPS) {
      const int64_t G = t.gstart[ch.tensor] + ch.begin;
#ifdef GEMEXT_HAVE_AVX512
      if (avx512) isa_avx512::run_eps_chunk(op, in, out, ch.len, G, rng);
      else
#endif
        isa_base::run_eps_chunk(op, in, out, ch.len, G, rng);
    } else {
      for (int64_t b = 0; b < ch.len; b += kBlock) {
        const int64_t n = std::min(kBlock, ch.len - b);
        const T* inb[NI];
        T* outb[NO > 0 ? NO : 1] = {};
        for (int k = 0; k < NI; ++k) inb[k] = in[k] + b;
        for (int k = 0; k < NO; ++k) outb[k] = out[k] + b;
        if constexpr (Op::TASKS) run_task_block(op, inb, outb, n, t.numels[ch.tensor], buf);
        else acc += run_block(op, inb, outb, n, static_cast<const T*>(nullptr), buf);
      }
    }
    if constexpr (Op::REDUCE) partial[c] = acc;
  }
  if constexpr (Op::REDUCE) {
    double sum = 0;
    for (double p : partial) sum += p;
    *static_cast<T*>(reduce_out) = static_cast<T>(sum);
  }
}

#define GEMEXT_INSTANTIATE_CPU(...) \
  template void cpu_run<__VA_ARGS__>(__VA_ARGS__, const Table&, Rng, int, void*);
GEMEXT_FOR_EACH_OP(GEMEXT_INSTANTIATE_CPU)

// Test hook: the scalar maths on n values, so Python can measure ulps and special cases.
template <typename T> void cpu_math(int fn, const T* x, T* y, T* y2, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if (fn == 0) y[i] = exp_(x[i]);
    else if (fn == 1) y[i] = log_(x[i]);
    else sincos_turns(x[i], y[i], y2[i]);
  }
}
template void cpu_math<float>(int, const float*, float*, float*, int64_t);
template void cpu_math<double>(int, const double*, double*, double*, int64_t);

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace gemext
