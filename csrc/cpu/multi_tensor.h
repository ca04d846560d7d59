// Multi-tensor machinery shared by every CPU op: group checks, chunking, parallel loops,
// deterministic reductions, dtype dispatch.
//
// A group is a set of aligned tensor lists (same length; entry i of every list has the same
// numel; one memory order, walked as flat storage: see check_list). Every tensor is cut into fixed chunks of kChunk elements and one
// at::parallel_for runs over the chunks of all tensors, so hundreds of small tensors and one huge
// tensor parallelize the same way. Reductions write one partial per chunk and sum them in chunk
// order: the result does not depend on the number of threads.
#pragma once

// ATen compiles its own kernels once per CPU capability and defines CPU_CAPABILITY_* per build;
// an extension gets the portable (array-loop) Vectorized unless it names one. setup.py builds
// with -march=native, so select the widest intrinsics the compiler targets, with ATen's own
// requirements for each (AVX-512: F, BW, VL, DQ; AVX2: FMA). Measured on an AVX-512 CPU at one
// thread, the whole SAM step was a few percent faster with AVX-512 than with AVX2. Every file
// that uses Vectorized includes this header first, so the whole library sees one definition.
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include "../common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace sam_kernels::cpu {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList primary) {
  std::vector<Chunk> chunks;
  chunks.reserve(primary.size());  // one chunk per tensor in the common case: no regrowth
  for (int64_t t = 0; t < static_cast<int64_t>(primary.size()); ++t) {
    const int64_t n = primary[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// The grain of at::parallel_for over `chunks`: all of them (one thread, no parallel region) when
// they hold fewer elements than one full chunk, where waking a second thread costs more than
// the work it would take (thousands of tiny tensors); else 1, each chunk a task.
inline int64_t chunk_grain(const std::vector<Chunk>& chunks) {
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  return total < kChunk ? std::max<int64_t>(1, static_cast<int64_t>(chunks.size())) : 1;
}

// Runs f(chunk) for every chunk, in parallel.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(chunks[i]);
  });
}

// dst <- src, bitwise, over the chunks (restore_, and the fused descents' skipped AMP steps).
inline void copy_chunks(const std::vector<Chunk>& chunks, at::TensorList dst, at::TensorList src) {
  const int64_t item = dst[0].element_size();
  for_each_chunk(chunks, [&](const Chunk& c) {
    auto* d = static_cast<char*>(dst[c.tensor].data_ptr());
    const auto* s = static_cast<const char*>(src[c.tensor].data_ptr());
    std::memcpy(d + c.begin * item, s + c.begin * item, (c.end - c.begin) * item);
  });
}

// Σ over chunks of f(chunk) -> double, summed in chunk order (deterministic).
template <typename F>
double reduce_chunks(const std::vector<Chunk>& chunks, const F& f) {
  std::vector<double> partials(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) partials[i] = f(chunks[i]);
  });
  double total = 0.0;
  for (double p : partials) total += p;
  return total;
}

// A 0-dim result in the reduction dtype of the op contract: fp64 for fp64 inputs, else fp32.
inline at::Tensor scalar_result(double value, at::ScalarType input) {
  const auto dtype = input == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(value, at::TensorOptions().dtype(dtype));
}

// Reads a 0-dim device scalar (sq_norm, dot) in the compute type.
template <typename acc_t>
acc_t read_scalar(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU like the tensors, got ", t.device());
  return static_cast<acc_t>(t.to(at::kDouble).item<double>());
}

// Group checks and the keep-mask hash are shared with the CUDA kernels (csrc/common.h).
using sam_kernels::check_list;
using sam_kernels::keep_element;

inline void check_primary(const char* op, const char* name, at::TensorList primary) {
  sam_kernels::check_primary(op, name, primary, c10::DeviceType::CPU);
}

template <typename T>
T* data(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// ---- element loops: one formula for the vector and the scalar path
//
// An op writes its per-element maths once, as a generic lambda body(T{}, i) that loads with
// load<T>, computes in T and stores with store. T is at::vec::Vectorized<scalar_t> on full
// vectors of fp32/fp64 data and the scalar compute type (opmath: float for fp16/bf16) elsewhere,
// so fp16/bf16 load, compute in float and round once on store, as in reference.py.

template <typename T>
struct is_vec : std::false_type {};
template <typename T>
struct is_vec<at::vec::Vectorized<T>> : std::true_type {};

template <typename scalar_t>
constexpr bool has_vec_path = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

template <typename T, typename scalar_t>
T load(const scalar_t* p, int64_t i) {
  if constexpr (is_vec<T>::value) {
    return T::loadu(p + i);
  } else {
    return static_cast<T>(p[i]);
  }
}

template <typename T, typename scalar_t>
void store(scalar_t* p, int64_t i, const T& v) {
  if constexpr (is_vec<T>::value) {
    v.store(p + i);
  } else {
    p[i] = static_cast<scalar_t>(v);
  }
}

// ---- streaming stores
//
// A store to a line not in cache first reads the line (write-allocate). A list that is written
// but not read in the same pass (the backups in perturb_, the weights in the fused descents)
// costs a read it does not need, and the lines it leaves in cache push out others. Past the
// last-level cache nothing written by a step is still cached at its next use (the forward and
// backward run between), so such lists are written with non-temporal stores there: 4 bytes per
// element less traffic each, the same values bitwise. Smaller lists keep ordinary stores: they
// may be read back from cache.

// Bytes of the last-level cache a step can count on: on Linux the largest cache sysfs lists for
// CPU 0 (glibc's sysconf reads cpuid, which a VM can report as the host's whole L3), at most
// 32 MiB; elsewhere, or unknown, 32 MiB. The cap: a VM's sysfs too can list the host's L3, shared
// with the host's other tenants (480 MiB on a 2-vCPU Xeon VM, where ordinary stores made
// ResNet-50's SAM step 1.2x as long as streaming ones). The environment variable
// SAM_KERNELS_STREAM_BYTES overrides it (0: always stream).
inline int64_t last_level_cache_bytes() {
  int64_t largest = 0;
#if defined(__linux__)
  for (int index = 0; index < 8; ++index) {
    std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    int64_t size = 0;
    char unit = 0;
    if (!(file >> size)) continue;
    file >> unit;  // "32768K": sizes are in KiB (or MiB)
    size *= unit == 'M' ? int64_t{1} << 20 : unit == 'K' ? int64_t{1} << 10 : 1;
    largest = std::max(largest, size);
  }
#endif
  constexpr int64_t cap = int64_t{32} << 20;
  return largest > 0 ? std::min(largest, cap) : cap;
}

inline int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("SAM_KERNELS_STREAM_BYTES")) return static_cast<int64_t>(std::atoll(env));
    return last_level_cache_bytes();
  }();
  return bytes;
}

// Whether a pass writes `list` (not read in the same pass) with streaming stores: the whole list
// must be larger than the last-level cache.
inline bool stream_writes(at::TensorList list) {
  int64_t bytes = 0;
  for (const auto& t : list) bytes += t.numel() * t.element_size();
  return bytes > stream_threshold_bytes();
}

// Ends a thread's streaming stores (they are weakly ordered): called before a chunk's work is
// seen as done.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// v -> p + i as a non-temporal store where the vector is aligned to its width and the ISA has
// one; an ordinary store otherwise (scalar path, unaligned tensors, other dtypes).
template <typename T, typename scalar_t>
void store_stream(scalar_t* p, int64_t i, const T& v) {
  if constexpr (is_vec<T>::value) {
    constexpr size_t bytes = sizeof(T);
    if (reinterpret_cast<uintptr_t>(p + i) % bytes == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, float>) return _mm512_stream_ps(p + i, static_cast<__m512>(v));
      if constexpr (std::is_same_v<scalar_t, double>) return _mm512_stream_pd(p + i, static_cast<__m512d>(v));
#elif defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) return _mm256_stream_ps(p + i, static_cast<__m256>(v));
      if constexpr (std::is_same_v<scalar_t, double>) return _mm256_stream_pd(p + i, static_cast<__m256d>(v));
#endif
    }
  }
  store(p, i, v);
}

// a·b + c rounded once, on both paths. The build does not contract a·b + c by itself
// (-ffp-contract=off: it would do so differently in each compiled variant of a loop), so a loop
// that wants the fused multiply-add says so; the SGD descent is 5 % faster with them on one thread.
template <typename T>
T fma_(const T& a, const T& b, const T& c) {
  if constexpr (is_vec<T>::value) {
    return at::vec::fmadd(a, b, c);
  } else {
    return std::fma(a, b, c);
  }
}

// sqrt / abs for both paths (Vectorized spells them as members).
template <typename T>
T vsqrt(const T& x) {
  if constexpr (is_vec<T>::value) {
    return x.sqrt();
  } else {
    return std::sqrt(x);
  }
}

template <typename T>
T vabs(const T& x) {
  if constexpr (is_vec<T>::value) {
    return x.abs();
  } else {
    return std::abs(x);
  }
}

// body(Vec{}, i) on every full vector of [begin, end) when vectorize (and the dtype has a vector
// path), body(acc_t{}, i) on the remaining elements.
template <typename scalar_t, typename Body>
void elementwise(int64_t begin, int64_t end, bool vectorize, const Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t i = begin;
  if constexpr (has_vec_path<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    if (vectorize) {
      for (; i + Vec::size() <= end; i += Vec::size()) body(Vec{}, i);
    }
  }
  for (; i < end; ++i) body(acc_t{}, i);
}

// Σ term(T{}, i) over [begin, end) as a double. The vector path sums short blocks in the data
// type (fp32 lanes, the contract's accumulation type) and folds each block into a double, so a
// chunk is both fast and at least as accurate as the fp32 contract.
template <typename scalar_t, typename Term>
double chunk_sum(int64_t begin, int64_t end, bool vectorize, const Term& term) {
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  int64_t i = begin;
  if constexpr (has_vec_path<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    while (vectorize && i + W <= end) {
      Vec acc(scalar_t(0));
      for (const int64_t stop = std::min(end, i + kBlock); i + W <= stop; i += W) acc = acc + term(Vec{}, i);
      scalar_t lanes[W];
      acc.store(lanes);
      for (int64_t l = 0; l < W; ++l) total += static_cast<double>(lanes[l]);
    }
  }
  for (; i < end; ++i) total += static_cast<double>(term(at::opmath_type<scalar_t>{}, i));
  return total;
}

// Running sums of an element loop that also reduces (the fused descents' telemetry): add_product()
// takes values of either path; take() returns the total as a double and starts again. A loop folds
// every kSumBlock elements, so fp32 lanes never sum more than a block, and the scalar path adds
// in double (as chunk_sum).
constexpr int64_t kSumBlock = 1024;

template <typename scalar_t>
struct LaneSum {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec lanes = Vec(scalar_t(0));
  double rest = 0.0;

  // Adds x·y: the vector path with one rounding (fma_), the scalar path rounded to T then added in double.
  template <typename T>
  void add_product(const T& x, const T& y) {
    if constexpr (is_vec<T>::value) {
      lanes = fma_(x, y, lanes);
    } else {
      rest += static_cast<double>(x * y);
    }
  }
  // Whether every value added since the last take() was finite, and their sum did not overflow.
  bool finite() const {
    if constexpr (has_vec_path<scalar_t>) {
      if ((lanes - lanes).zero_mask() != (1 << Vec::size()) - 1) return false;
    }
    return std::isfinite(rest);
  }
  double take() {
    double total = rest;
    rest = 0.0;
    if constexpr (has_vec_path<scalar_t>) {
      scalar_t out[Vec::size()];
      lanes.store(out);
      for (int64_t l = 0; l < Vec::size(); ++l) total += static_cast<double>(out[l]);
      lanes = Vec(scalar_t(0));
    }
    return total;
  }
};

// f(chunk, lo, hi, acc) over every chunk, in parallel. Without `sums`, once per chunk with acc
// null (or in kSumBlock pieces with acc whose totals are dropped, when `blocks`: a loop that sums
// for itself). With `sums` (fp32/fp64; 2 elements when `both`, else 1 or more), in kSumBlock
// pieces with acc = two LaneSums that f adds to; the per-chunk totals are then added in chunk
// order to sums[0] and, when `both`, to sums[1] (deterministic whatever the thread count; nothing
// else is written, so sums[1] keeps its bits, -0.0 included).
template <typename scalar_t, typename F>
void for_each_chunk_summing(const std::vector<Chunk>& chunks, const std::optional<at::Tensor>& sums, bool both,
                            const F& f, bool blocks = false) {
  if (!sums && !blocks) {
    for_each_chunk(chunks, [&](const Chunk& c) { f(c, c.begin, c.end, static_cast<LaneSum<scalar_t>*>(nullptr)); });
    return;
  }
  std::vector<std::array<double, 2>> partials(chunks.size(), {0.0, 0.0});
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& c = chunks[k];
      LaneSum<scalar_t> acc[2];
      for (int64_t lo = c.begin; lo < c.end; lo += kSumBlock) {
        f(c, lo, std::min(c.end, lo + kSumBlock), acc);
        partials[k][0] += acc[0].take();
        partials[k][1] += acc[1].take();
      }
    }
  });
  if (!sums) return;
  double total[2] = {0.0, 0.0};
  for (const auto& p : partials) {
    total[0] += p[0];
    total[1] += p[1];
  }
  if (sums->scalar_type() == at::kDouble) {
    double* out = sums->data_ptr<double>();
    out[0] += total[0];
    if (both) out[1] += total[1];
  } else {
    float* out = sums->data_ptr<float>();
    out[0] += static_cast<float>(total[0]);
    if (both) out[1] += static_cast<float>(total[1]);
  }
}

// f(std::bool_constant<flags>...) with each runtime flag made a compile-time constant, so an
// element loop's options (telemetry sums, the finite check) are `if constexpr` in its body: the
// fused SGD descent testing them per vector ran 15-20 % slower, even with every option off (one
// thread, AVX-512).
template <typename F>
decltype(auto) with_static_flags(const F& f) {
  return f();
}

template <typename F, typename... Rest>
decltype(auto) with_static_flags(const F& f, bool first, Rest... rest) {
  if (first) return with_static_flags([&](auto... more) { return f(std::true_type{}, more...); }, rest...);
  return with_static_flags([&](auto... more) { return f(std::false_type{}, more...); }, rest...);
}

// Dispatch over the four float dtypes; scalar_t is the storage type.
#define SAM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace sam_kernels::cpu
