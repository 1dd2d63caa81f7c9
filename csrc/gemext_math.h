// Element-wise maths shared by the CPU (cpu_ops.cpp) and CUDA (cuda_ops.cu) kernels.
//
// Why our own exp/log/sincos: glibc's expf is scalar, which makes the fused CPU loops
// compute-bound; -ffast-math would vectorise it but drops IEEE NaN/Inf semantics. These
// versions are branch-free (selects only), so gcc vectorises them with -O3 -mavx2 -mfma,
// and they use explicit fma() with contraction disabled on both sides (-ffp-contract=off,
// nvcc --fmad=false), so CPU and CUDA compute bit-identical element-wise results.
//
// Random numbers: Philox-4x32-10 (Salmon et al. 2011, the Random123 constants) keyed by
// (seed, offset, global element index i): counter = (lo(i/4), hi(i/4), lo(offset), hi(offset)),
// key = (lo(seed), hi(seed)). Words w0..w3 become uniforms in (0,1), never 0 or 1:
//   float32 tensors:  u = ((w >> 8) + 0.5) * 2^-24   (exact in float)
//   float64 tensors:  u = (w + 0.5) * 2^-32          (exact in double)
// and Box-Muller turns (u0,u1) into n0 = r cos(2πu1), n1 = r sin(2πu1), r = sqrt(-2 log u0),
// (u2,u3) into n2, n3. Element i uses n[i % 4]. ε is computed in the tensor's dtype.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GEMEXT_HD __host__ __device__ __forceinline__
#else
#define GEMEXT_HD inline __attribute__((always_inline))
#endif
// Fully unroll small constant loops: gcc only vectorises the outer element loop when the
// inner loops (Philox rounds, pointer lists) have been flattened first.
#if defined(__CUDACC__)
#define GEMEXT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define GEMEXT_UNROLL _Pragma("GCC unroll 16")
#else
#define GEMEXT_UNROLL
#endif

namespace gemext {

// ---------------------------------------------------------------- bit-level helpers
template <typename T> struct FP;
template <> struct FP<float> {
  using U = uint32_t;
  using I = int32_t;
  static constexpr int MANT = 23, BIAS = 127;
  static constexpr float MAGIC = 0x1.8p23f;     // adding it rounds to an integer (|v| < 2^22)
  static constexpr float MIN_NORMAL = 0x1p-126f;
  static constexpr float EXP_HI = 89.0f, EXP_LO = -104.0f;  // beyond: inf / 0 after scaling
  static constexpr float LN2_HI = 0x1.62e4p-1f, LN2_LO = 0x1.7f7d1cp-20f;
};
template <> struct FP<double> {
  using U = uint64_t;
  using I = int64_t;
  static constexpr int MANT = 52, BIAS = 1023;
  static constexpr double MAGIC = 0x1.8p52;
  static constexpr double MIN_NORMAL = 0x1p-1022;
  static constexpr double EXP_HI = 710.0, EXP_LO = -746.0;
  static constexpr double LN2_HI = 0x1.62e42fefa3800p-1, LN2_LO = 0x1.ef35793c76730p-45;
};

GEMEXT_HD uint32_t to_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
GEMEXT_HD uint64_t to_bits(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
template <typename T> GEMEXT_HD T from_bits(typename FP<T>::U u) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == 4) return __uint_as_float(u);
  else return __longlong_as_double(static_cast<long long>(u));
#else
  T x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

GEMEXT_HD float fma_(float a, float b, float c) { return ::fmaf(a, b, c); }
GEMEXT_HD double fma_(double a, double b, double c) { return ::fma(a, b, c); }
GEMEXT_HD float sqrt_(float x) { return ::sqrtf(x); }
GEMEXT_HD double sqrt_(double x) { return ::sqrt(x); }

// Horner with literal coefficients, lowest degree first: poly(x, c0, c1, ...) = c0 + x(c1 + ...).
template <typename T> GEMEXT_HD T poly(T, T c0) { return c0; }
template <typename T, typename... R> GEMEXT_HD T poly(T x, T c0, T c1, R... rest) {
  return fma_(poly(x, c1, static_cast<T>(rest)...), x, c0);
}

// Small integer (|k| < 2^22) to floating point through the magic constant: AVX2 has no
// vectorised int64 -> double conversion, this is two integer/float adds.
template <typename T> GEMEXT_HD T small_int_to_fp(typename FP<T>::I k) {
  using U = typename FP<T>::U;
  return from_bits<T>(to_bits(FP<T>::MAGIC) + static_cast<U>(k)) - FP<T>::MAGIC;
}

// ---------------------------------------------------------------- exp
GEMEXT_HD float expm_poly(float r) {  // (e^r - 1 - r) / r^2 on |r| <= ln2/2 (Cephes expf)
  return poly(r, 5.0000001201e-1f, 1.6666665459e-1f, 4.1665795894e-2f, 8.3334519073e-3f,
              1.3981999507e-3f, 1.9875691500e-4f);
}
GEMEXT_HD double expm_poly(double r) {  // Taylor to r^13: truncation < 2^-60 on |r| <= ln2/2
  return poly(r, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
              1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800);
}

// exp(x): x = n ln2 + r, e^r by polynomial, 2^n applied as two factors so that results in
// the subnormal range round once and exp(x > max) overflows to inf. NaN propagates.
// Out of [EXP_LO, EXP_HI] the result is that of the bound, +0 or +inf (what this formula
// gives there; the maths on such x is garbage and replaced): selects on the result rather
// than a clamp of x, which gcc vectorises into fewer instructions (and NaN takes the same
// path as before either way).
template <typename T> GEMEXT_HD T exp_(T x) {
  using F = FP<T>;
  using U = typename F::U;
  using I = typename F::I;
  const T kf_m = fma_(x, static_cast<T>(1.4426950408889634), F::MAGIC);  // rint(x/ln2) + MAGIC
  const I n = static_cast<I>(to_bits(kf_m) - to_bits(F::MAGIC));
  const T kf = kf_m - F::MAGIC;
  T r = fma_(-kf, F::LN2_HI, x);
  r = fma_(-kf, F::LN2_LO, r);
  const T p = fma_(expm_poly(r), r * r, r) + T(1);
  // n is only meaningful in range; the shifts wrap (unsigned) outside it, harmlessly
  const U un = static_cast<U>(n), un1 = static_cast<U>(n >> 1), un2 = un - un1;
  const T s1 = from_bits<T>((un1 + F::BIAS) << F::MANT);
  const T s2 = from_bits<T>((un2 + F::BIAS) << F::MANT);
  T y = (p * s1) * s2;
  y = x > F::EXP_HI ? from_bits<T>(static_cast<U>(2 * F::BIAS + 1) << F::MANT) : y;  // +inf
  return x < F::EXP_LO ? T(0) : y;  // comparisons are false for NaN: it passes through
}

// ---------------------------------------------------------------- log
// log(m) = 2 atanh(s) = 2s + s^3 P(s^2), s = (m-1)/(m+1), |s| <= 0.1716
GEMEXT_HD float atanh_tail(float z) { return poly(z, 2.0f / 3, 2.0f / 5, 2.0f / 7, 2.0f / 9); }
GEMEXT_HD double atanh_tail(double z) {  // series to s^21: truncation < 2^-60
  return poly(z, 2.0 / 3, 2.0 / 5, 2.0 / 7, 2.0 / 9, 2.0 / 11, 2.0 / 13, 2.0 / 15, 2.0 / 17,
              2.0 / 19, 2.0 / 21);
}

// log(x) of a normal, finite x > 0 (the core of log_ below): x = 2^k m with m in
// [sqrt(1/2), sqrt(2)) (musl's bit trick), log m = 2 atanh(s); `kbias` is subtracted from k.
template <typename T> GEMEXT_HD T log_core(T x, typename FP<T>::I kbias) {
  using F = FP<T>;
  using U = typename F::U;
  using I = typename F::I;
  const U one = to_bits(T(1));
  const U sqrt_half = to_bits(static_cast<T>(0.70710678118654752440));
  const U mant_mask = (U(1) << F::MANT) - 1;
  U ix = to_bits(x) + (one - sqrt_half);
  const I k = static_cast<I>(ix >> F::MANT) - F::BIAS - kbias;
  ix = (ix & mant_mask) + sqrt_half;
  const T f = from_bits<T>(ix) - T(1);
  const T s = f / (T(2) + f);
  const T kf = small_int_to_fp<T>(k);
  const T z = s * s;
  const T lm_tail = (s * z) * atanh_tail(z);  // log m - 2s
  return fma_(kf, F::LN2_HI, fma_(T(2), s, fma_(kf, F::LN2_LO, lm_tail)));
}

// log(x): log(0) = -inf, log(x<0) = NaN, log(inf) = inf, NaN -> NaN; subnormals are rescaled
// by 2^MANT first (x * 1 otherwise: exact, so normal x take log_core's path bit for bit).
template <typename T> GEMEXT_HD T log_(T x) {
  using F = FP<T>;
  using U = typename F::U;
  // Only selects of already computed values: a conditional multiply could trap, which stops
  // gcc's if-conversion and with it vectorisation.
  const bool sub = x < F::MIN_NORMAL;
  const T xs = x * (sub ? from_bits<T>(static_cast<U>(F::MANT + F::BIAS) << F::MANT) : T(1));
  T y = log_core(xs, sub ? F::MANT : 0);
  const U inf_bits = static_cast<U>(2 * F::BIAS + 1) << F::MANT;
  const T inf = from_bits<T>(inf_bits), qnan = from_bits<T>(inf_bits | (U(1) << (F::MANT - 1)));
  y = !(x < inf) ? x : y;  // +inf and NaN: x itself
  y = x == T(0) ? -inf : y;
  return x < T(0) ? qnan : y;
}

// ---------------------------------------------------------------- sincos in turns
GEMEXT_HD float sin_poly(float z) {  // (sin a - a) / a^3, |a| <= pi/4 (Cephes sinf)
  return poly(z, -1.6666654611e-1f, 8.3321608736e-3f, -1.9515295891e-4f);
}
GEMEXT_HD float cos_poly(float z) {  // (cos a - 1) / a^2 (Cephes cosf)
  return poly(z, -0.5f, 4.166664568298827e-2f, -1.388731625493765e-3f, 2.443315711809948e-5f);
}
GEMEXT_HD double sin_poly(double z) {  // Taylor to a^19
  return poly(z, -1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800,
              1.0 / 6227020800.0, -1.0 / 1307674368000.0, 1.0 / 355687428096000.0,
              -1.0 / 121645100408832000.0);
}
GEMEXT_HD double cos_poly(double z) {  // Taylor to a^20
  return poly(z, -0.5, 1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800, 1.0 / 479001600,
              -1.0 / 87178291200.0, 1.0 / 20922789888000.0, -1.0 / 6402373705728000.0,
              1.0 / 2432902008176640000.0);
}

// sin(2πu), cos(2πu). Working in turns makes the range reduction exact (u - q/4 is exact),
// which is what Box-Muller needs; valid for |u| < 2^20 (float) / 2^50 (double).
template <typename T> GEMEXT_HD void sincos_turns(T u, T& s, T& c) {
  using F = FP<T>;
  using U = typename F::U;
  const T q_m = fma_(u, T(4), F::MAGIC);
  const U q = to_bits(q_m) - to_bits(F::MAGIC);  // quadrant in the low two bits
  const T f = fma_(q_m - F::MAGIC, T(-0.25), u);  // in [-1/8, 1/8]
  const T a = f * static_cast<T>(6.28318530717958647692);
  const T z = a * a;
  const T sa = fma_(a * z, sin_poly(z), a);
  const T ca = fma_(z, cos_poly(z), T(1));
  // Swap on odd quadrants, then negate (flip the sign bit, as unary minus does) on quadrants
  // 2, 3 (sin) and 1, 2 (cos): integer masks instead of selects, which cost gcc blends.
  constexpr int SIGN = 8 * sizeof(T) - 1;
  const U swap = (U(0) - (q & 1)) & (to_bits(sa) ^ to_bits(ca));
  s = from_bits<T>(to_bits(sa) ^ swap ^ ((q & 2) << (SIGN - 1)));
  c = from_bits<T>(to_bits(ca) ^ swap ^ (((q + 1) & 2) << (SIGN - 1)));
}

// ---------------------------------------------------------------- Philox-4x32-10
GEMEXT_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

GEMEXT_HD void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  GEMEXT_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

struct Rng {
  uint64_t seed;
  uint64_t offset;
};

GEMEXT_HD float uniform_from_word(uint32_t w, float) {
  return (static_cast<float>(static_cast<int32_t>(w >> 8)) + 0.5f) * 0x1p-24f;
}
GEMEXT_HD double uniform_from_word(uint32_t w, double) {
  const double wd = from_bits<double>(0x4330000000000000ull | w) - 0x1p52;  // exact (double)w
  return (wd + 0.5) * 0x1p-32;
}

// Box-Muller: two Philox words -> two normals (n0 = r cos 2πu1, n1 = r sin 2πu1).
// u0 is normal, positive and finite, so log_core gives log_'s bits without its special cases.
template <typename T> GEMEXT_HD void box_muller(uint32_t w0, uint32_t w1, T& n0, T& n1) {
  const T r = sqrt_(T(-2) * log_core(uniform_from_word(w0, T(0)), 0));
  T s, c;
  sincos_turns(uniform_from_word(w1, T(0)), s, c);
  n0 = r * c;
  n1 = r * s;
}

// Philox counter of group g (global elements 4g .. 4g+3).
GEMEXT_HD void philox_counter(const Rng& rng, uint64_t g, uint32_t (&c)[4]) {
  c[0] = static_cast<uint32_t>(g);
  c[1] = static_cast<uint32_t>(g >> 32);
  c[2] = static_cast<uint32_t>(rng.offset);
  c[3] = static_cast<uint32_t>(rng.offset >> 32);
}

// The four normals of Philox group g.
template <typename T> GEMEXT_HD void normals4(const Rng& rng, uint64_t g, T (&n)[4]) {
  uint32_t c[4];
  philox_counter(rng, g, c);
  philox4x32_10(c, static_cast<uint32_t>(rng.seed), static_cast<uint32_t>(rng.seed >> 32));
  box_muller(c[0], c[1], n[0], n[1]);
  box_muller(c[2], c[3], n[2], n[3]);
}

// ---------------------------------------------------------------- per-element formulas
// Each op is a functor over NIN input values and NOUT output values (in-place buffers are
// passed as an input and as an output), plus ε for ops with EPS. Reductions (REDUCE) return
// the element's term instead. TASKS ops (GemTaskSumOp) sum over a leading task dimension of
// some inputs through start/step/finish instead of one call per element. The CPU and CUDA
// drivers own addressing; these own the maths.
// σ = exp(ρ); σ²/σ₀² is computed as exp(2(ρ-ρ₀)) and 1/σ₀² as exp(-2ρ₀): no division, and
// no inf*0 when ρ and ρ₀ are both large.
template <typename T> struct OpBase {
  using scalar = T;
  static constexpr bool EPS = false, REDUCE = false, TASKS = false;
  static constexpr int NACC = 0;  // TASKS ops: running sums per element
  GEMEXT_HD void init() {}
};

// θ = μ + σ ε.  in: μ, ρ   out: θ
template <typename T> struct SampleOp : OpBase<T> {
  static constexpr int NIN = 2, NOUT = 1;
  static constexpr bool EPS = true;
  GEMEXT_HD T operator()(const T* v, T* o, T eps) const {
    o[0] = fma_(exp_(v[1]), eps, v[0]);
    return T(0);
  }
};

// ∂θ/∂ρ applied to g: g ε σ (backward of sample).  in: g, ρ   out: dρ
template <typename T> struct ReparamGradOp : OpBase<T> {
  static constexpr int NIN = 2, NOUT = 1;
  static constexpr bool EPS = true;
  GEMEXT_HD T operator()(const T* v, T* o, T eps) const {
    o[0] = (v[0] * eps) * exp_(v[1]);
    return T(0);
  }
};

// Gradients of -ELBO = nll(θ) + β KL(q||p):  dμ = g + β(μ-μ₀)/σ₀²,  dρ = g ε σ + β(σ²/σ₀² - 1).
// in: g, μ, ρ, μ₀, ρ₀   out: dμ, dρ
template <typename T> struct ElboBackwardOp : OpBase<T> {
  static constexpr int NIN = 5, NOUT = 2;
  static constexpr bool EPS = true;
  T beta;
  GEMEXT_HD T operator()(const T* v, T* o, T eps) const {
    const T g = v[0], mu = v[1], rho = v[2], mu0 = v[3], rho0 = v[4];
    const T inv_var0 = exp_(T(-2) * rho0), sigma = exp_(rho);
    // σ²/σ₀² as (σ/σ₀²)·σ saves an exp; the intermediate only over/underflows early when
    // |ρ₀| > 43 (float32), i.e. σ₀ outside [1e-19, 1e19].
    o[0] = fma_(beta, (mu - mu0) * inv_var0, g);
    o[1] = fma_(beta, (sigma * inv_var0) * sigma - T(1), (g * eps) * sigma);
    return T(0);
  }
};

// KL term: ρ₀ - ρ + (σ² + (μ-μ₀)²)/(2σ₀²) - ½.  in: μ, ρ, μ₀, ρ₀
template <typename T> struct KlOp : OpBase<T> {
  static constexpr int NIN = 4, NOUT = 0;
  static constexpr bool REDUCE = true;
  GEMEXT_HD T operator()(const T* v, T*, T) const {
    const T d = v[0] - v[2];
    const T ratio = exp_(T(2) * (v[1] - v[3]));
    return fma_(T(0.5), fma_(d * d, exp_(T(-2) * v[3]), ratio - T(1)), v[3] - v[1]);
  }
};

// Backward of the KL sum times the upstream scalar *gout (a pointer: on CUDA it stays on the
// device, no sync).  in: μ, ρ, μ₀, ρ₀   out: dμ, dρ, dμ₀, dρ₀
template <typename T> struct KlBackwardOp : OpBase<T> {
  static constexpr int NIN = 4, NOUT = 4;
  const T* gout;
  T scale;
  GEMEXT_HD void init() { scale = *gout; }
  GEMEXT_HD T operator()(const T* v, T* o, T) const {
    const T d = v[0] - v[2];
    const T inv_var0 = exp_(T(-2) * v[3]);
    const T ratio = exp_(T(2) * (v[1] - v[3]));
    const T gmu = scale * (d * inv_var0);
    o[0] = gmu;
    o[1] = scale * (ratio - T(1));
    o[2] = -gmu;
    o[3] = scale * (T(1) - fma_(d * d, inv_var0, ratio));
    return T(0);
  }
};

// The Gradient-EM statistic ĝ of one element, the one formula behind GemOp and GemTaskSumOp:
//   GEM:   ĝμ₀ = (μa-μ₀)/σ₀²,  ĝρ₀ = ((μa-μ₀)² + σa²)/σ₀² - 1
//   GEM+:  ĝμ₀ = (μa-μb)/σ₀²,  ĝρ₀ = ((μa-μ₀)² + σa² - (μb-μ₀)² - σb²)/σ₀²
// p: μa, ρa, [μb, ρb] (PLUS: λ_b's statistic subtracted).
template <typename T, bool PLUS>
GEMEXT_HD void gem_stat(T mu0, T rho0, const T* p, T& gmu, T& grho) {
  const T da = p[0] - mu0;
  const T inv_var0 = exp_(T(-2) * rho0);
  const T ra = exp_(T(2) * (p[1] - rho0));
  if constexpr (PLUS) {
    const T db = p[2] - mu0;
    const T rb = exp_(T(2) * (p[3] - rho0));
    gmu = (p[0] - p[2]) * inv_var0;
    grho = fma_((p[0] - p[2]) * (da + db), inv_var0, ra - rb);  // da²-db² = (μa-μb)(da+db)
  } else {
    gmu = da * inv_var0;
    grho = fma_(da * da, inv_var0, ra - T(1));
  }
}

// Gradient-EM ascent direction ĝ (gem_stat), optionally GEM-BML+ (PLUS), written (ACC=false)
// or added times `weight` into buffers (ACC=true).
// in: μ₀, ρ₀, μa, ρa, [μb, ρb], [gμ₀, gρ₀]   out: gμ₀, gρ₀
template <typename T, bool PLUS, bool ACC> struct GemOp : OpBase<T> {
  static constexpr int NIN = 4 + (PLUS ? 2 : 0) + (ACC ? 2 : 0), NOUT = 2;
  T weight;
  GEMEXT_HD T operator()(const T* v, T* o, T) const {
    T gmu, grho;
    gem_stat<T, PLUS>(v[0], v[1], v + 2, gmu, grho);
    if constexpr (ACC) {
      o[0] = fma_(weight, gmu, v[NIN - 2]);
      o[1] = fma_(weight, grho, v[NIN - 1]);
    } else {
      o[0] = weight * gmu;
      o[1] = weight * grho;
    }
    return T(0);
  }
};

// ĝ summed over a leading task dimension of the posterior, added times `weight` into buffers:
//   gμ₀ += weight · Σ_t ĝμ₀(λ₀; λa_t [, λb_t]),   gρ₀ likewise.
// A TASKS op: its stacked inputs (k in [POST_BEGIN, POST_END)) hold `ntasks` slices of the
// n elements of the prior, task t of element j at j + t·n. For each element the drivers call
// start(acc), then step(v, acc) for t = 0, 1, ..., ntasks-1 in that order (v: the inputs with
// the stacked ones at task t), then finish(v, acc, o) (v: the inputs not stacked). The sum is
// formed in T, from -0 (the exact additive identity, so ntasks = 1 gives the same bits as
// GemOp<T, PLUS, true>), by one thread per element: deterministic, and CPU and CUDA agree
// bitwise.
// in: μ₀, ρ₀, μa, ρa, [μb, ρb], gμ₀, gρ₀   out: gμ₀, gρ₀
template <typename T, bool PLUS> struct GemTaskSumOp : OpBase<T> {
  static constexpr int NIN = 6 + (PLUS ? 2 : 0), NOUT = 2;
  static constexpr bool TASKS = true;
  static constexpr int NACC = 2, POST_BEGIN = 2, POST_END = NIN - 2;
  int64_t ntasks;
  T weight;
  static constexpr GEMEXT_HD bool stacked(int k) { return k >= POST_BEGIN && k < POST_END; }
  GEMEXT_HD void start(T* acc) const {
    acc[0] = -T(0);
    acc[1] = -T(0);
  }
  GEMEXT_HD void step(const T* v, T* acc) const {
    T gmu, grho;
    gem_stat<T, PLUS>(v[0], v[1], v + POST_BEGIN, gmu, grho);
    acc[0] = acc[0] + gmu;
    acc[1] = acc[1] + grho;
  }
  GEMEXT_HD void finish(const T* v, const T* acc, T* o) const {
    o[0] = fma_(weight, acc[0], v[NIN - 2]);
    o[1] = fma_(weight, acc[1], v[NIN - 1]);
  }
};

// One step of variational online Newton on q = N(μ, σ²) with prior N(μ₀, σ₀²):
//   c  = curv, or the reparameterisation estimate max(g ε / σ, 0) (CURV=false; ε regenerated)
//   h' = (1-δ) h + δ c,   λ₀ = β/σ₀²
//   μ' = μ - lr (g + λ₀(μ-μ₀)) / (λ₀ + h' + damping)          (CORR=false)
//   μ' = μ - lr (g + λ₀(μ-μ₀) - corr) / (λ₀ + damping)         (CORR=true)
//   ρ' = -½ log(λ₀ + h')
// in: μ, ρ, h, g, [curv], μ₀, ρ₀, [corr]   out: μ, ρ, h (the same buffers as the first three)
template <typename T, bool CURV, bool CORR> struct VonStepOp : OpBase<T> {
  static constexpr int NIN = 6 + (CURV ? 1 : 0) + (CORR ? 1 : 0), NOUT = 3;
  static constexpr bool EPS = !CURV;
  T lr, beta, keep, decay, damping;  // keep = 1 - decay, rounded once on the host
  GEMEXT_HD T operator()(const T* v, T* o, T eps) const {
    const T mu = v[0], rho = v[1], h = v[2], g = v[3];
    const T mu0 = v[CURV ? 5 : 4], rho0 = v[CURV ? 6 : 5];
    T c;
    if constexpr (CURV) {
      c = v[4];
    } else {
      // 1/σ as exp(-ρ): no division; a select, not std::max, so NaN passes through
      const T est = (g * eps) * exp_(-rho);
      c = est < T(0) ? T(0) : est;
    }
    const T h_new = fma_(decay, c, keep * h);
    const T lam0 = beta * exp_(T(-2) * rho0);
    const T prec = lam0 + h_new;
    T num = fma_(lam0, mu - mu0, g), den;
    if constexpr (CORR) {
      num = num - v[NIN - 1];
      den = lam0 + damping;
    } else {
      den = prec + damping;
    }
    o[0] = fma_(-lr, num / den, mu);
    o[1] = T(-0.5) * log_(prec);
    o[2] = h_new;
    return T(0);
  }
};

}  // namespace gemext
