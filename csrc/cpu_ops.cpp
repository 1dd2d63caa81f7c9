// CPU driver: the flat work of all tensors is cut into fixed chunks, chunks are split over
// OpenMP threads (dynamically: on a shared machine a descheduled thread must not hold up the
// others), and each chunk runs the op's element function in `omp simd` loops over
// blocks whose ε is first generated into an L1-resident buffer. Fixed chunks make the
// reduction (per-chunk double partials summed in chunk order) independent of the thread count.
// TASKS ops (a sum over a leading task dimension) run each block task by task, t = 0, 1, ...,
// with the running sums of the block's elements in an L1-resident buffer: every element's sum
// is formed in the same order whatever the chunking and thread count.
#include <algorithm>
#include <vector>

#include "gemext_launch.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace gemext {
namespace {

constexpr int64_t kChunk = 1 << 15;       // elements per unit of parallel work
constexpr int64_t kBlock = 1024;          // elements per ε buffer (4 KiB of float)
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

#ifndef GEMEXT_PHILOX_STEPS
#define GEMEXT_PHILOX_STEPS 2
#endif
constexpr int64_t kMaxGroups = kBlock / 4 + 8;  // groups touched by one block, rounded up

#ifdef __AVX2__
// philox4x32_10 (gemext_math.h) on 8 groups per step, 2 x 4 in the 64-bit lanes of AVX2
// vectors: a 32-bit word sits in the low half of its lane and the high half is don't-care,
// since vpmuludq reads only the low halves. A round is then 2 products, 2 half swaps (hi to
// the low half) and 4 xors per 4 groups, with no packing; the 64-bit product doubles as the
// next round's lo word. Several independent steps are interleaved to hide the product latency.
struct PhiloxAvx2 {
  __m256i k0[10], k1[10];  // round keys, broadcast
  __m256i r0_c0, r0_c2;    // round 0's terms that do not depend on the group: the product of
                           // the constant lo(offset) word, and hi(offset) ^ k1
  __m256i r0_c1;           // round 0's lo1 word (the same product)
  explicit PhiloxAvx2(const Rng& rng) {
    uint32_t a = static_cast<uint32_t>(rng.seed), b = static_cast<uint32_t>(rng.seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(a));
      k1[r] = _mm256_set1_epi32(static_cast<int>(b));
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    const __m256i p1 = _mm256_mul_epu32(
        _mm256_set1_epi64x(static_cast<int64_t>(static_cast<uint32_t>(rng.offset))),
        _mm256_set1_epi64x(0xCD9E8D57ll));
    r0_c0 = _mm256_xor_si256(swap(p1), k0[0]);
    r0_c1 = p1;
    r0_c2 = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset >> 32))),
                             k1[0]);
  }
  static __m256i swap(__m256i x) { return _mm256_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)); }

  // Words of groups g .. g + 8S - 1 into w0..w3[0 .. 8S).
  template <int S>
  void run(uint64_t g, uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) const {
    constexpr int V = 2 * S;  // vectors of 4 groups: v even groups g+8s+{0,2,4,6}, odd +1
    const __m256i m0 = _mm256_set1_epi64x(0xD2511F53ll);
    const __m256i m1 = _mm256_set1_epi64x(0xCD9E8D57ll);
    __m256i c0[V], c1[V], c2[V], c3[V];
    const __m256i base = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(g)),
                                          _mm256_setr_epi64x(0, 2, 4, 6));
    GEMEXT_UNROLL
    for (int v = 0; v < V; ++v) {
      // the counter (lo(g), hi(g)) is the 64-bit g itself; round 0 uses the constants
      const __m256i gv = _mm256_add_epi64(base, _mm256_set1_epi64x(8 * (v >> 1) + (v & 1)));
      const __m256i p0 = _mm256_mul_epu32(gv, m0);
      c0[v] = _mm256_xor_si256(r0_c0, _mm256_srli_epi64(gv, 32));
      c1[v] = r0_c1;
      c2[v] = _mm256_xor_si256(swap(p0), r0_c2);
      c3[v] = p0;
    }
    GEMEXT_UNROLL
    for (int r = 1; r < 10; ++r) {
      GEMEXT_UNROLL
      for (int v = 0; v < V; ++v) {
        const __m256i p0 = _mm256_mul_epu32(c0[v], m0);
        const __m256i p1 = _mm256_mul_epu32(c2[v], m1);
        c0[v] = _mm256_xor_si256(swap(p1), _mm256_xor_si256(c1[v], k0[r]));
        c2[v] = _mm256_xor_si256(swap(p0), _mm256_xor_si256(c3[v], k1[r]));
        c1[v] = p1;
        c3[v] = p0;
      }
    }
    GEMEXT_UNROLL
    for (int s = 0; s < S; ++s) {  // even/odd lanes -> 8 consecutive 32-bit words
      const auto pack = [](__m256i e, __m256i o) {
        return _mm256_blend_epi32(e, _mm256_slli_epi64(o, 32), 0xAA);
      };
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + 8 * s), pack(c0[2 * s], c0[2 * s + 1]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + 8 * s), pack(c1[2 * s], c1[2 * s + 1]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + 8 * s), pack(c2[2 * s], c2[2 * s + 1]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + 8 * s), pack(c3[2 * s], c3[2 * s + 1]));
    }
  }
};
#endif

// ε for global elements [g, g+n) into buf; returns the pointer to element g's ε. Two passes:
// Philox words (8 groups per AVX2 step) into a planar buffer, then Box-Muller, vectorised.
template <typename T> const T* fill_normals(const Rng& rng, int64_t g, int64_t n, T* buf) {
  const int64_t g0 = g >> 2, ngroups = ((g + n + 3) >> 2) - g0;
  alignas(32) uint32_t w[4][kMaxGroups];
  int64_t q = 0;
#ifdef __AVX2__
  const PhiloxAvx2 ph(rng);
  constexpr int S = GEMEXT_PHILOX_STEPS;
  for (; q + 8 * S <= ngroups; q += 8 * S)
    ph.run<S>(static_cast<uint64_t>(g0 + q), w[0] + q, w[1] + q, w[2] + q, w[3] + q);
  for (; q + 8 <= ngroups; q += 8)
    ph.run<1>(static_cast<uint64_t>(g0 + q), w[0] + q, w[1] + q, w[2] + q, w[3] + q);
#endif
  for (; q < ngroups; ++q) {
    uint32_t c[4];
    philox_counter(rng, static_cast<uint64_t>(g0 + q), c);
    philox4x32_10(c, static_cast<uint32_t>(rng.seed), static_cast<uint32_t>(rng.seed >> 32));
    for (int k = 0; k < 4; ++k) w[k][q] = c[k];
  }
  GEMEXT_IVDEP
  for (q = 0; q < ngroups; ++q) {
    box_muller(w[0][q], w[1][q], buf[4 * q], buf[4 * q + 1]);
    box_muller(w[2][q], w[3][q], buf[4 * q + 2], buf[4 * q + 3]);
  }
  return buf + (g - 4 * g0);
}

// One block of n elements; REDUCE ops leave their terms in `terms` and return their sum.
template <class Op, typename T = typename Op::scalar>
double run_block(const Op& op, const T* const (&in)[Op::NIN], T* const* out, int64_t n,
                 const T* eps, T* terms) {
  constexpr int NI = Op::NIN, NO = Op::NOUT > 0 ? Op::NOUT : 1;
  GEMEXT_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    T v[NI], o[NO];
    GEMEXT_UNROLL
    for (int k = 0; k < NI; ++k) v[k] = in[k][j];
    const T term = op(v, o, Op::EPS ? eps[j] : T(0));
    if constexpr (Op::REDUCE) {
      terms[j] = term;
    } else {
      GEMEXT_UNROLL
      for (int k = 0; k < NO; ++k) out[k][j] = o[k];
    }
  }
  double s = 0;
  if constexpr (Op::REDUCE) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += static_cast<double>(terms[j]);
  }
  return s;
}

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
  (void)parallel;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    const T* in[NI];
    T* out[NO > 0 ? NO : 1] = {};
    for (int k = 0; k < NI; ++k) in[k] = reinterpret_cast<const T*>(t.ptrs[k][ch.tensor]) + ch.begin;
    for (int k = 0; k < NO; ++k) out[k] = reinterpret_cast<T*>(t.ptrs[NI + k][ch.tensor]) + ch.begin;
    // buf holds ε, the terms of a reduction, or a TASKS op's running sums
    alignas(64) T buf[(Op::TASKS ? Op::NACC : 1) * kBlock + 8];
    double acc = 0;
    for (int64_t b = 0; b < ch.len; b += kBlock) {
      const int64_t n = std::min(kBlock, ch.len - b);
      const T* inb[NI];
      T* outb[NO > 0 ? NO : 1] = {};
      for (int k = 0; k < NI; ++k) inb[k] = in[k] + b;
      for (int k = 0; k < NO; ++k) outb[k] = out[k] + b;
      if constexpr (Op::TASKS) {
        run_task_block(op, inb, outb, n, t.numels[ch.tensor], buf);
      } else {
        const T* eps = nullptr;
        if constexpr (Op::EPS) eps = fill_normals(rng, t.gstart[ch.tensor] + ch.begin + b, n, buf);
        acc += run_block(op, inb, outb, n, eps, buf);
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
