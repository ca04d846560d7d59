// Force-included (g++ -include) before every CUDA source compiled for the CPU emulation: the
// torch headers the sources use (parsed before the renames at the end), the CUDA language
// keywords as host C++, the fiber runtime (runtime.cpp) and the launch macro.
//
// The sources are compiled unmodified. Three renames, made after every torch header is parsed:
// the device type CUDA becomes CPU (device checks, TORCH_LIBRARY_IMPL's dispatch key),
// is_cuda() becomes is_cpu(), and (on the command line) namespace sam_kernels becomes
// sam_kernels_emu, so the ops register under their own namespace on CPU tensors and no inline
// function interposes with the real extension's.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
// libstdc++'s <math.h> brings std::sqrt(float) etc. into the global namespace, as CUDA's headers
// give ::sqrt(float): without it ::sqrt(float) would compute in double and round once more.
#include <math.h>

static_assert(std::is_same_v<decltype(::sqrt(1.0f)), float>, "::sqrt(float) must be the float overload");
static_assert(std::is_same_v<decltype(::fabs(1.0f)), float>, "::fabs(float) must be the float overload");
static_assert(std::is_same_v<decltype(::fmin(1.0f, 1.0f)), float>, "::fmin(float) must be the float overload");
static_assert(std::is_same_v<decltype(::fmax(1.0f, 1.0f)), float>, "::fmax(float) must be the float overload");

#include "cuda_runtime_api.h"

// ----------------------------------------------------------------------------- language keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __grid_constant__
#define __launch_bounds__(...)
// Blocks run one after another on one host thread, so a function-scope static is block-scoped
// storage. Unlike a GPU's shared memory it is zero before the first block and keeps its values
// between blocks: reading it uninitialised is NOT detected.
#define __shared__ static

namespace cuda_emu {

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Set by the scheduler before it resumes a thread (fiber).
extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;

// Parks the calling thread until every thread of its block has arrived; throws (from the
// launch) when some threads of the block finished without arriving.
void syncthreads();

// Runs body(ctx) as every thread of every block of the grid (blocks in order, threads as
// fibers), or as thread 0 only (thread0_only: see Launch). param_bytes: the size of the kernel's
// parameters (recorded for the tests). Throws
// c10::Error for an unsupported shape, a barrier not reached by every thread, or a misaligned
// access seen by the alignment sanitizer.
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t param_bytes, bool thread0_only, void (*body)(void*),
              void* ctx);

// A kernel parameter type with `static constexpr bool kEmulateThreadZeroOnly = true` runs as thread
// 0 of each block only (blockDim still says the launch's size): the harness's recording functors,
// which drive the launcher with billions of synthetic elements, need only one thread per block.
template <typename T>
constexpr bool thread_zero_only() {
  if constexpr (requires { T::kEmulateThreadZeroOnly; }) {
    return T::kEmulateThreadZeroOnly;
  } else {
    return false;
  }
}

// Threads other than 0 get this from a block reduction (CUB promises the total to thread 0 only).
template <typename T>
T poison() {
  if constexpr (std::is_floating_point_v<T>) {
    return std::numeric_limits<T>::quiet_NaN();
  } else if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(std::numeric_limits<T>::min() + 0x5A5A);
  } else {  // aggregates of floats (Sums<A, N>): every component a NaN
    T t;
    std::memset(static_cast<void*>(&t), 0xFF, sizeof t);
    return t;
  }
}

// A kernel launch: the arguments are converted to the kernel's parameter types once, as the
// CUDA runtime copies them to the parameter buffer; every thread then gets its own copy.
template <typename... P>
struct Launch {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;

  template <typename... Args>
  void operator()(Args&&... args) const {
    using Params = std::tuple<std::decay_t<P>...>;
    struct Ctx {
      void (*kernel)(P...);
      Params params;
    } ctx{kernel, Params(std::forward<Args>(args)...)};
    constexpr size_t bytes = (size_t{0} + ... + sizeof(std::decay_t<P>));
    constexpr bool thread0_only = (false || ... || thread_zero_only<std::decay_t<P>>());
    run_grid(name, grid, block, bytes, thread0_only,
             [](void* c) {
               auto* x = static_cast<Ctx*>(c);
               std::apply(x->kernel, x->params);
             },
             &ctx);
  }
};

template <typename... P>
Launch<P...> launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*kernel)(P...)) {
  TORCH_CHECK(shared_bytes == 0, "cuda_emu: dynamic shared memory is not emulated");
  return Launch<P...>{name, kernel, grid, block};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)
#define gridDim (::cuda_emu::grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads()
#define SAM_KERNELS_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::cuda_emu::launch(#__VA_ARGS__, grid, block, shared_bytes, stream, __VA_ARGS__)

// ----------------------------------------------------------------------------- device functions
// Threads switch only at barriers, so a read-modify-write is atomic.
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  const unsigned int old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}

inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// ----------------------------------------------------------------------------- renames
#define CUDA CPU
#define is_cuda is_cpu
