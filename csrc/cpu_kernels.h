// Element loops of the CPU driver for one instruction set. cpu_ops.cpp includes this file once
// per instruction set, inside its own namespace (gemext::isa_base and, for AVX-512, under
// `#pragma GCC target`, gemext::isa_avx512), with GEMEXT_KERNELS_AVX512 set to 0 or 1. Both are
// the same source: the per-element maths (gemext_math.h) and the order of the operations are
// the same, only the vector width differs, so the results are bitwise the same (IEEE
// operations, no contraction; the integer Philox rounds are exact). The one thing no build
// pins down is which operand's sign and payload a NaN result carries when two NaNs meet
// (x86 returns the first source operand, and the compiler orders commutative operands).
//
// No include guard: included several times on purpose.

// Philox steps per iteration of run_eps_chunk (4·S vectors of Philox state in registers; the
// iteration covers S·4·kGroups elements). Measured at 10^7 weights on one core of a Xeon
// (Sapphire Rapids class):
// 2 hides the product latency better with AVX2; with AVX-512, 1 keeps elbo_backward's seven
// streams faster (von_step and sample are within a few % either way).
#ifdef GEMEXT_PHILOX_STEPS
constexpr int kPhiloxSteps = GEMEXT_PHILOX_STEPS;
#else
constexpr int kPhiloxSteps = GEMEXT_KERNELS_AVX512 ? 1 : 2;
#endif

#if GEMEXT_KERNELS_AVX512 || defined(__AVX2__)
// philox4x32_10 (gemext_math.h), kGroups groups per step in two vectors (even and odd groups)
// whose 64-bit lanes each hold one group's word in the low half, the high half don't-care:
// vpmuludq reads only the low halves. A round is then per vector 2 products, 2 half swaps
// (moving hi to the low half) and 2 three-way xors, with no packing, the 64-bit product
// doubling as the next round's lo word. S steps are interleaved to hide the product latency.
struct Philox {
#if GEMEXT_KERNELS_AVX512
  using V = __m512i;
  static constexpr int kLanes = 8;
  static V set1_32(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static V set1_64(uint64_t x) { return _mm512_set1_epi64(static_cast<long long>(x)); }
  static V add64(V a, V b) { return _mm512_add_epi64(a, b); }
  static V mul(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V srl32(V a) { return _mm512_srli_epi64(a, 32); }
  static V swap(V x) { return _mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(0xB1)); }
  static V xor2(V a, V b) { return _mm512_xor_si512(a, b); }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static V lane_offsets() { return _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0); }
  static void store_pair(uint32_t* w, V e, V o) {  // even/odd lanes -> consecutive words
    _mm512_storeu_si512(w, _mm512_mask_blend_epi32(0xAAAA, e, _mm512_slli_epi64(o, 32)));
  }
#else
  using V = __m256i;
  static constexpr int kLanes = 4;
  static V set1_32(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V set1_64(uint64_t x) { return _mm256_set1_epi64x(static_cast<long long>(x)); }
  static V add64(V a, V b) { return _mm256_add_epi64(a, b); }
  static V mul(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V srl32(V a) { return _mm256_srli_epi64(a, 32); }
  static V swap(V x) { return _mm256_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)); }
  static V xor2(V a, V b) { return _mm256_xor_si256(a, b); }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(a, _mm256_xor_si256(b, c)); }
  static V lane_offsets() { return _mm256_setr_epi64x(0, 2, 4, 6); }
  static void store_pair(uint32_t* w, V e, V o) {
    _mm256_storeu_si256(reinterpret_cast<V*>(w), _mm256_blend_epi32(e, _mm256_slli_epi64(o, 32), 0xAA));
  }
#endif
  static constexpr int kGroups = 2 * kLanes;  // groups per step

  V k0[10], k1[10];  // round keys, broadcast
  V r0_c0, r0_c1, r0_c2;  // round 0's group-independent terms: lo(offset)'s product p gives
                          // c0 = hi(p) ^ k0 (before ^ hi(g)) and c1 = lo(p); c2 = hi(offset) ^ k1
  explicit Philox(const Rng& rng) {
    uint32_t a = static_cast<uint32_t>(rng.seed), b = static_cast<uint32_t>(rng.seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = set1_32(a);
      k1[r] = set1_32(b);
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    const V p1 = mul(set1_64(static_cast<uint32_t>(rng.offset)), set1_64(0xCD9E8D57u));
    r0_c0 = xor2(swap(p1), k0[0]);
    r0_c1 = p1;
    r0_c2 = xor2(set1_32(static_cast<uint32_t>(rng.offset >> 32)), k1[0]);
  }

  // Words of groups g .. g + S·kGroups - 1 into w0..w3[0 .. S·kGroups).
  template <int S>
  GEMEXT_INLINE void run(uint64_t g, uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) const {
    constexpr int NV = 2 * S;  // vector v: groups g + kGroups·(v/2) + (v%2) + {0, 2, 4, ...}
    const V m0 = set1_64(0xD2511F53u), m1 = set1_64(0xCD9E8D57u);
    V c0[NV], c1[NV], c2[NV], c3[NV];
    const V base = add64(set1_64(g), lane_offsets());
    GEMEXT_UNROLL
    for (int v = 0; v < NV; ++v) {  // round 0: the counter (lo(g), hi(g)) is the 64-bit g
      const V gv = add64(base, set1_64(kGroups * (v >> 1) + (v & 1)));
      const V p0 = mul(gv, m0);
      c0[v] = xor2(r0_c0, srl32(gv));
      c1[v] = r0_c1;
      c2[v] = xor2(swap(p0), r0_c2);
      c3[v] = p0;
    }
    GEMEXT_UNROLL
    for (int r = 1; r < 10; ++r) {
      GEMEXT_UNROLL
      for (int v = 0; v < NV; ++v) {
        const V p0 = mul(c0[v], m0), p1 = mul(c2[v], m1);
        c0[v] = xor3(swap(p1), c1[v], k0[r]);
        c2[v] = xor3(swap(p0), c3[v], k1[r]);
        c1[v] = p1;
        c3[v] = p0;
      }
    }
    GEMEXT_UNROLL
    for (int s = 0; s < S; ++s) {
      store_pair(w0 + kGroups * s, c0[2 * s], c0[2 * s + 1]);
      store_pair(w1 + kGroups * s, c1[2 * s], c1[2 * s + 1]);
      store_pair(w2 + kGroups * s, c2[2 * s], c2[2 * s + 1]);
      store_pair(w3 + kGroups * s, c3[2 * s], c3[2 * s + 1]);
    }
  }
};
#define GEMEXT_KERNELS_PHILOX_SIMD 1
#endif

// Box-Muller on the Philox words of ng groups (word k of group q in wk[q]) into the 4·ng normals
// in element order; vectorised over the groups.
template <typename T>
GEMEXT_INLINE void box_muller_groups(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2,
                                     const uint32_t* w3, int64_t ng, T* e) {
  GEMEXT_IVDEP
  for (int64_t q = 0; q < ng; ++q) {
    box_muller(w0[q], w1[q], e[4 * q], e[4 * q + 1]);
    box_muller(w2[q], w3[q], e[4 * q + 2], e[4 * q + 3]);
  }
}

// ε of global elements [g, g+n), n <= kBlock, into buf (kBlock + 4·kGroupPad elements); returns
// the pointer to element g's ε. Two passes: Philox words into a planar buffer (a last partial
// SIMD step computed whole, its extra groups unused), then Box-Muller.
template <typename T> const T* fill_normals(const Rng& rng, int64_t g, int64_t n, T* buf) {
  const int64_t g0 = g >> 2, ngroups = ((g + n + 3) >> 2) - g0;
  alignas(64) uint32_t w[4][kMaxGroups];
  int64_t q = 0;
#ifdef GEMEXT_KERNELS_PHILOX_SIMD
  const Philox ph(rng);
  for (; q < ngroups; q += Philox::kGroups)
    ph.run<1>(static_cast<uint64_t>(g0 + q), w[0] + q, w[1] + q, w[2] + q, w[3] + q);
#else
  for (; q < ngroups; ++q) {
    uint32_t c[4];
    philox_counter(rng, static_cast<uint64_t>(g0 + q), c);
    philox4x32_10(c, static_cast<uint32_t>(rng.seed), static_cast<uint32_t>(rng.seed >> 32));
    for (int k = 0; k < 4; ++k) w[k][q] = c[k];
  }
#endif
  box_muller_groups(w[0], w[1], w[2], w[3], q, buf);
  return buf + (g - 4 * g0);
}

// One block of n elements; REDUCE ops leave their terms in `terms` and return their sum.
template <class Op, typename T = typename Op::scalar>
GEMEXT_INLINE double run_block(const Op& op, const T* const (&in)[Op::NIN], T* const* out,
                               int64_t n, const T* eps, T* terms) {
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

// One chunk (len elements, global indices from G) of an op with ε. The body runs in steps of
// S·kGroups Philox groups aligned to the global index: each generates its ε into a small
// buffer and applies the op to it right away, so the step's loads issue while ε is still being
// computed and the hardware prefetcher sees a steady stream (a separate ε pass over a large
// block leaves memory idle meanwhile). The unaligned head and the tail take fill_normals.
template <class Op, typename T = typename Op::scalar>
void run_eps_chunk(const Op& op, const T* const (&in)[Op::NIN], T* const* out, int64_t len,
                   int64_t G, const Rng& rng) {
  constexpr int NI = Op::NIN, NO = Op::NOUT;
  static_assert(Op::EPS && !Op::REDUCE && !Op::TASKS && NO > 0, "an element-wise op with ε");
  alignas(64) T buf[kBlock + 4 * kGroupPad];
  const auto block = [&](int64_t j, int64_t n, const T* eps) GEMEXT_LAMBDA_INLINE {
    const T* inb[NI];
    T* outb[NO];
    for (int k = 0; k < NI; ++k) inb[k] = in[k] + j;
    for (int k = 0; k < NO; ++k) outb[k] = out[k] + j;
    run_block(op, inb, outb, n, eps, buf);
  };
  const auto generic = [&](int64_t j, int64_t n) {
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      block(j + b, m, fill_normals(rng, G + j + b, m, buf));
    }
  };
#ifdef GEMEXT_KERNELS_PHILOX_SIMD
  constexpr int S = kPhiloxSteps;
  constexpr int64_t kStep = 4 * Philox::kGroups;  // elements per Philox step
  int64_t j = std::min(len, (-G) & (kStep - 1));  // up to the first global multiple of kStep
  if (j > 0) generic(0, j);
  const Philox ph(rng);
  for (; j + S * kStep <= len; j += S * kStep) {
    alignas(64) uint32_t w[4][S * Philox::kGroups];
    alignas(64) T eps[S * kStep];
    ph.run<S>(static_cast<uint64_t>((G + j) >> 2), w[0], w[1], w[2], w[3]);
    box_muller_groups(w[0], w[1], w[2], w[3], S * Philox::kGroups, eps);
    block(j, S * kStep, eps);
  }
  if (j < len) generic(j, len - j);
#else
  generic(0, len);
#endif
}

#undef GEMEXT_KERNELS_PHILOX_SIMD
