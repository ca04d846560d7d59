// The one multi-tensor launcher of the CUDA backend (after Apex / PyTorch multi_tensor_apply).
//
// A group is a set of aligned tensor lists (entry i of every list has the same numel). Every
// tensor is cut into chunks of kChunkSize elements; one block handles one chunk. The pointers,
// sizes and block -> (tensor, chunk) maps of a launch travel BY VALUE as the kernel argument
// (TensorListMetadata), so there is no host-to-device copy and the launch is CUDA-graph safe.
// Two table sizes: the classic 4 KB of kernel arguments (320 blocks, 36-110 tensors per launch),
// and, for a group that does not fit one of those, 32 KB (CUDA >= 12.1 toolkit and driver, Volta
// and newer; setup.py refuses older archs; not during CUDA-graph capture): 2048 blocks and
// ~340-750 tensors, so a ResNet-50 or GPT-2 parameter list takes one launch per pass.
// SAM_KERNELS_CUDA_TABLES=small forces 4 KB (to compare, or to test the splitting). When a table's tensor or block
// slots fill, the launcher launches and starts a new table, carrying a tensor that was cut mid-way.
//
// Element layout: thread t of a block handles the kIlp contiguous elements starting at
// base + t * kIlp, base stepping by kBlockSize * kIlp through the chunk. The group is one 16-byte
// vector access when the tensor is aligned (checked on the host, per tensor: every pointer aligned
// to the vector width and numel a multiple of kIlp), masked scalar accesses otherwise. Because a
// thread's elements are contiguous, block-wide scans over (thread, element) follow index order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// Every kernel launch: SAM_KERNELS_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) is
// CUDA's kernel<<<grid, block, shared_bytes, stream>>>(args...). A host C++ build of these
// sources (the CPU emulation the tests run, docs/verification.md) defines it before this file.
#ifndef SAM_KERNELS_LAUNCH
#define SAM_KERNELS_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace sam_kernels::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;  // a multiple of kBlockSize * kIlp for every dtype
constexpr int kVecBytes = 16;          // one vector access per thread per list and iteration

// Elements per thread and vector access for storage type T (fp32: 4, fp16/bf16: 8, fp64: 2).
template <typename T>
constexpr int ilp_of() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

// Kernel-argument budgets. The table takes kTableBytes; the rest is left to the functor.
struct SmallTables {
  static constexpr int kArgBytes = 4096;
  static constexpr int kTableBytes = 3800;
  static constexpr int kMaxBlocks = 320;
  using TensorIndex = uint8_t;
};
struct LargeTables {
  static constexpr int kArgBytes = 32764;
  static constexpr int kTableBytes = 31744;
  static constexpr int kMaxBlocks = 2048;
  using TensorIndex = uint16_t;
};

template <int kDepth_, typename Limits>
struct TensorListMetadata {
  static constexpr int kDepth = kDepth_;
  static constexpr int kArgBytes = Limits::kArgBytes;
  static constexpr int kMaxBlocks = Limits::kMaxBlocks;
  using TensorIndex = typename Limits::TensorIndex;
  // Each tensor slot costs kDepth pointers, size, aux and an alignment flag.
  static constexpr int kMaxTensors =
      (Limits::kTableBytes - 8 - kMaxBlocks * (4 + static_cast<int>(sizeof(TensorIndex)))) / (kDepth * 8 + 8 + 8 + 1);
  static_assert(kMaxTensors >= 1 && kMaxTensors <= std::numeric_limits<TensorIndex>::max(),
                "block_to_tensor cannot index every tensor slot");

  void* ptrs[kDepth][kMaxTensors];  // nullptr: the list is absent (optional list)
  int64_t sizes[kMaxTensors];
  int64_t aux[kMaxTensors];      // per-tensor value of the op (RNG key, row length)
  int64_t block_offset;          // blocks of the previous launches of this apply
  int block_to_chunk[kMaxBlocks];
  TensorIndex block_to_tensor[kMaxBlocks];
  bool aligned[kMaxTensors];
};

// The tensor a block works on: one pointer per list (nullptr for an absent optional list).
template <int kDepth>
struct BlockTensors {
  void* ptrs[kDepth];
};

// What one block works on.
struct ChunkRef {
  int64_t begin;  // element range [begin, end) of the tensor
  int64_t end;
  bool aligned;
  int64_t block;  // index of the chunk over the whole apply: (list position, chunk) order
  int64_t aux;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads the N elements [i, i+N) (those below end). Aligned tensors have numel % N == 0, so a
// group that starts below end is whole: one vector load.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_group(const void* p, int64_t i, int64_t end, bool aligned) {
  const T* q = static_cast<const T*>(p);
  Vec<T, N> r{};
  if (aligned) {
    if (i < end) r = *reinterpret_cast<const Vec<T, N>*>(q + i);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (i + k < end) r.v[k] = q[i + k];
  }
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store_group(void* p, const Vec<T, N>& r, int64_t i, int64_t end, bool aligned) {
  T* q = static_cast<T*>(p);
  if (aligned) {
    if (i < end) *reinterpret_cast<Vec<T, N>*>(q + i) = r;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (i + k < end) q[i + k] = r.v[k];
  }
}

// Calls f(i) for this thread's groups of the chunk, i = first element of the group. Every thread
// of the block makes the same number of calls (i may lie past the end), so f may use block-wide
// collectives.
template <int kIlp, typename F>
__device__ __forceinline__ void for_each_group(const ChunkRef& c, F&& f) {
  for (int64_t base = c.begin; base < c.end; base += int64_t{kBlockSize} * kIlp)
    f(base + int64_t{threadIdx.x} * kIlp);
}

// __grid_constant__: the table is read straight from parameter space (no per-thread copy of up
// to 32 KB into local memory); a block reads only its own entries.
template <typename Meta, typename Functor>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(const __grid_constant__ Meta meta, const __grid_constant__ Functor f) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = int64_t{meta.block_to_chunk[blockIdx.x]} * kChunkSize;
  const int64_t end = begin + kChunkSize < meta.sizes[t] ? begin + kChunkSize : meta.sizes[t];
  BlockTensors<Meta::kDepth> tensors;
#pragma unroll
  for (int l = 0; l < Meta::kDepth; ++l) tensors.ptrs[l] = meta.ptrs[l][t];
  f(tensors, ChunkRef{begin, end, meta.aligned[t], meta.block_offset + blockIdx.x, meta.aux[t]});
}

// Number of chunks (= blocks over all launches) of a group; zero-size tensors have none.
inline int64_t count_chunks(at::TensorList primary) {
  int64_t n = 0;
  for (const auto& t : primary) n += (t.numel() + kChunkSize - 1) / kChunkSize;
  return n;
}

// Whether this process launches with 32 KB tables: toolkit and driver >= 12.1, unless
// SAM_KERNELS_CUDA_TABLES=small (read at every call, so tests can compare both).
inline bool large_tables() {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  static const bool driver_ok = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010;
  }();
  const char* env = std::getenv("SAM_KERNELS_CUDA_TABLES");
  if (env != nullptr && *env != '\0') {
    TORCH_CHECK(std::strcmp(env, "small") == 0 || std::strcmp(env, "auto") == 0,
                "SAM_KERNELS_CUDA_TABLES=", env, ": use auto (32 KB kernel-argument tables when the driver allows) "
                "or small (4 KB tables)");
    if (std::strcmp(env, "small") == 0) return false;
  }
  return driver_ok;
#else
  return false;
#endif
}

// Fills tables of type Meta and launches one kernel per full table.
template <typename Meta, typename Functor>
void launch_tables(const std::array<at::TensorList, Functor::kDepth>& lists, at::IntArrayRef aux, const Functor& f) {
  constexpr int kDepth = Functor::kDepth;
  static_assert(sizeof(Meta) + sizeof(Functor) <= Meta::kArgBytes - 64, "kernel arguments over the limit");
  const at::TensorList primary = lists[0];
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](const Meta& meta, int blocks) {
    SAM_KERNELS_LAUNCH(blocks, kBlockSize, 0, stream, multi_tensor_kernel<Meta, Functor>)(meta, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  Meta meta{};
  int tensors = 0;
  int blocks = 0;
  for (size_t i = 0; i < primary.size(); ++i) {
    const int64_t n = primary[i].numel();
    if (n == 0) continue;
    bool aligned = n % Functor::kIlp == 0;
    for (int l = 0; l < kDepth; ++l) {
      void* p = lists[l].empty() ? nullptr : lists[l][i].data_ptr();
      meta.ptrs[l][tensors] = p;
      if (p != nullptr)
        aligned = aligned && reinterpret_cast<uintptr_t>(p) % (Functor::kIlp * lists[l][i].element_size()) == 0;
    }
    meta.sizes[tensors] = n;
    meta.aux[tensors] = aux.empty() ? 0 : aux[i];
    meta.aligned[tensors] = aligned;
    ++tensors;
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<typename Meta::TensorIndex>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == Meta::kMaxBlocks || (tensors == Meta::kMaxTensors && last_chunk)) {
        launch(meta, blocks);
        meta.block_offset += blocks;
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // carry the cut tensor into slot 0 of the next table
          for (int l = 0; l < kDepth; ++l) meta.ptrs[l][0] = meta.ptrs[l][tensors - 1];
          meta.sizes[0] = meta.sizes[tensors - 1];
          meta.aux[0] = meta.aux[tensors - 1];
          meta.aligned[0] = meta.aligned[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks);
}

// Runs f over every chunk of the group. lists[l] is list l of the table (an EMPTY list stands for
// an absent optional list: null pointers); aux (empty or one value per tensor) lands in ChunkRef.
// Zero-size tensors are skipped. The caller has set the device guard and checked the lists.
// f(const BlockTensors<kDepth>&, const ChunkRef&) runs once per chunk, as a block.
template <typename Functor>
void multi_tensor_apply(const std::array<at::TensorList, Functor::kDepth>& lists, at::IntArrayRef aux,
                        const Functor& f) {
  TORCH_INTERNAL_ASSERT(aux.empty() || aux.size() == lists[0].size());
  using Small = TensorListMetadata<Functor::kDepth, SmallTables>;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  // The 32 KB tables only where a 4 KB one would not hold the group (each launch carries, and the
  // host clears, the whole table): results are bitwise the same either way. large_tables() first:
  // it also rejects a bad SAM_KERNELS_CUDA_TABLES on calls that would not need the large tables.
  // Not while a CUDA graph is being captured, as PyTorch's own multi_tensor_apply does: launches
  // are cheap on replay, and 4 KB kernel nodes are what graphs have always supported.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
  const bool allowed = large_tables() && capture == cudaStreamCaptureStatusNone;
  int64_t tensors = 0;
  for (const auto& t : lists[0]) tensors += t.numel() > 0;
  if (allowed && (tensors > Small::kMaxTensors || count_chunks(lists[0]) > Small::kMaxBlocks)) {
    launch_tables<TensorListMetadata<Functor::kDepth, LargeTables>>(lists, aux, f);
    return;
  }
#endif
  launch_tables<Small>(lists, aux, f);
}

}  // namespace sam_kernels::cuda
