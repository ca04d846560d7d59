// topk_mask (global, exact count) and nm_mask (n of every m along the reduction dim); see reference.py.
//
// Both rank scores through order-preserving unsigned keys: a larger score has a larger key; NaN
// gets key 0 (below everything); -0.0 and +0.0 share a key (they tie); fp64 ±inf tie with
// ±DBL_MAX. That is reference.py's ranking of nan_to_num(scores.double(), nan=-inf). Ties go to
// the lower flattened position (list order, then row-major).
//
// topk_mask without sorting: an MSD radix select finds the k-th largest key (the threshold) one
// 8-bit digit at a time (a histogram pass over the candidates that match the digits chosen so far,
// then a one-thread pick of the digit), entirely in device memory. Then every key above the
// threshold is kept, and of the keys equal to it the first `left` in position order: one pass
// counts ties per chunk, one block scans the counts, and the marking pass ranks ties inside a
// chunk with a block scan (a thread's elements are contiguous, so scan order = position order).
// Launches (fp32/fp16/bf16 keys have 4 digits, fp64 8): 1 state memset + 2 per digit + 3.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cfloat>
#include <limits>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <vector>

#include "elementwise.cuh"

namespace sam_kernels::cuda {
namespace {

constexpr int kMaxGroup = 32;  // nm_mask: groups up to this size are ranked from a per-thread key array

template <typename T>
using key_type = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;

__device__ __forceinline__ uint32_t rank_key(float x) {
  if (::isnan(x)) return 0u;
  const uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t rank_key(double x) {
  if (::isnan(x)) return 0ull;
  x = x == 0.0 ? 0.0 : ::fmin(::fmax(x, -DBL_MAX), DBL_MAX);
  const uint64_t b = static_cast<uint64_t>(__double_as_longlong(x));
  return (b >> 63) ? ~b : (b | (1ull << 63));
}

// fp16/bf16 widen exactly to float: same order as in fp64.
template <typename T>
__device__ __forceinline__ key_type<T> key_of(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return rank_key(x);
  } else {
    return rank_key(static_cast<float>(x));
  }
}

// Device-side state of one topk_mask call (zero-initialized).
template <typename Key>
struct TopkState {
  unsigned long long hist[sizeof(Key)][256];  // one histogram per digit, most significant first
  Key prefix;      // digits chosen so far; the threshold key once all are chosen
  Key chosen;      // bits of prefix chosen so far
  long long left;  // keys matching prefix still to keep; at the end: ties to keep
};

template <typename Key>
__host__ __device__ constexpr int digit_shift(int digit) {
  return 8 * (static_cast<int>(sizeof(Key)) - 1 - digit);
}

// lists: 0 scores. Histogram of `digit` over the keys that match the chosen digits.
template <typename T>
struct HistogramFunctor {
  using Key = key_type<T>;
  static constexpr int kIlp = ilp_of<T>();
  static constexpr int kDepth = 1;
  TopkState<Key>* state;
  int digit;

  __device__ void operator()(const BlockTensors<1>& tensors, const ChunkRef& c) const {
    __shared__ unsigned int bins[256];
    for (int b = threadIdx.x; b < 256; b += kBlockSize) bins[b] = 0;
    __syncthreads();
    const Key prefix = state->prefix;
    const Key chosen = state->chosen;
    const int shift = digit_shift<Key>(digit);
    for_each_group<kIlp>(c, [&](int64_t i) {
      if (i >= c.end) return;
      const auto v = load_group<T, kIlp>(tensors.ptrs[0], i, c.end, c.aligned);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const Key key = key_of(v.v[k]);
        if (i + k < c.end && (key & chosen) == prefix) atomicAdd(&bins[(key >> shift) & 0xFF], 1u);
      }
    });
    __syncthreads();
    // Integer counts: the sum does not depend on the order of the atomics.
    for (int b = threadIdx.x; b < 256; b += kBlockSize)
      if (bins[b] != 0) atomicAdd(&state->hist[digit][b], static_cast<unsigned long long>(bins[b]));
  }
};

// One thread: the bin of `digit` that holds the `left`-th largest candidate.
template <typename Key>
__global__ void radix_select_kernel(TopkState<Key>* state, int digit, int64_t k) {
  long long left = digit == 0 ? k : state->left;
  const int shift = digit_shift<Key>(digit);
  for (int b = 255; b >= 0; --b) {
    const long long n = static_cast<long long>(state->hist[digit][b]);
    if (n >= left) {
      state->prefix |= static_cast<Key>(b) << shift;
      state->chosen |= static_cast<Key>(0xFF) << shift;
      state->left = left;
      return;
    }
    left -= n;
  }
}

// lists: 0 scores. counts[chunk] = number of keys equal to the threshold in the chunk.
template <typename T>
struct TieCountFunctor {
  using Key = key_type<T>;
  static constexpr int kIlp = ilp_of<T>();
  static constexpr int kDepth = 1;
  const TopkState<Key>* state;
  long long* counts;

  __device__ void operator()(const BlockTensors<1>& tensors, const ChunkRef& c) const {
    const Key threshold = state->prefix;
    int ties = 0;
    for_each_group<kIlp>(c, [&](int64_t i) {
      if (i >= c.end) return;
      const auto v = load_group<T, kIlp>(tensors.ptrs[0], i, c.end, c.aligned);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) ties += (i + k < c.end && key_of(v.v[k]) == threshold) ? 1 : 0;
    });
    using BlockReduce = cub::BlockReduce<int, kBlockSize>;
    __shared__ typename BlockReduce::TempStorage tmp;
    const int total = BlockReduce(tmp).Sum(ties);
    if (threadIdx.x == 0) counts[c.block] = total;
  }
};

// One block: counts[i] <- Σ_{j<i} counts[j] (ties before chunk i), in place.
__global__ void __launch_bounds__(kBlockSize) exclusive_scan_kernel(long long* counts, int64_t n) {
  const int64_t per = (n + kBlockSize - 1) / kBlockSize;
  const int64_t begin = threadIdx.x * per;
  const int64_t end = begin + per < n ? begin + per : n;
  long long sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += counts[i];
  using BlockScan = cub::BlockScan<long long, kBlockSize>;
  __shared__ typename BlockScan::TempStorage tmp;
  BlockScan(tmp).ExclusiveSum(sum, sum);
  for (int64_t i = begin; i < end; ++i) {
    const long long c = counts[i];
    counts[i] = sum;
    sum += c;
  }
}

// lists: 0 scores (r), 1 masks (w). Keep keys above the threshold and the first `left` ties.
template <typename T>
struct MarkFunctor {
  using Key = key_type<T>;
  static constexpr int kIlp = ilp_of<T>();
  static constexpr int kDepth = 2;
  const TopkState<Key>* state;
  const long long* ties_before;  // exclusive scan of the tie counts, per chunk

  __device__ void operator()(const BlockTensors<2>& tensors, const ChunkRef& c) const {
    const Key threshold = state->prefix;
    const long long left = state->left;
    long long before = ties_before[c.block];
    using BlockScan = cub::BlockScan<int, kBlockSize>;
    __shared__ typename BlockScan::TempStorage tmp;
    for_each_group<kIlp>(c, [&](int64_t i) {  // every thread runs every iteration: block scan inside
      const auto v = load_group<T, kIlp>(tensors.ptrs[0], i, c.end, c.aligned);
      Key keys[kIlp];
      int ties = 0;
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        keys[k] = key_of(v.v[k]);
        ties += (i + k < c.end && keys[k] == threshold) ? 1 : 0;
      }
      int rank = 0;
      int block_ties = 0;
      BlockScan(tmp).ExclusiveSum(ties, rank, block_ties);
      __syncthreads();  // tmp is reused by the next iteration's scan
      long long r = before + rank;
      Vec<bool, kIlp> out;
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        bool keep = keys[k] > threshold;
        if (i + k < c.end && keys[k] == threshold) keep = r++ < left;
        out.v[k] = keep;
      }
      store_group<bool, kIlp>(tensors.ptrs[1], out, i, c.end, c.aligned);
      before += block_ties;
    });
  }
};

// lists: 0 scores (r), 1 masks (w); aux: row length (elements per row of the 2-D view).
// The thread at the first element of a group ranks the group and writes all of its entries.
template <typename T>
struct NmFunctor {
  using Key = key_type<T>;
  static constexpr int kIlp = 1;  // scalar accesses: groups start anywhere
  static constexpr int kDepth = 2;
  int n;
  int m;

  __device__ void operator()(const BlockTensors<2>& tensors, const ChunkRef& c) const {
    const T* scores = static_cast<const T*>(tensors.ptrs[0]);
    bool* masks = static_cast<bool*>(tensors.ptrs[1]);
    const int64_t cols = c.aux;
    for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlockSize) {
      const int64_t col = i % cols;
      if (col % m != 0) continue;
      const int r = cols - col < m ? static_cast<int>(cols - col) : m;  // a row's last group may be short
      if (r <= kMaxGroup) {
        Key keys[kMaxGroup];
        for (int j = 0; j < r; ++j) keys[j] = key_of(scores[i + j]);
        for (int j = 0; j < r; ++j) {
          int rank = 0;
          for (int l = 0; l < r; ++l) rank += (keys[l] > keys[j] || (keys[l] == keys[j] && l < j)) ? 1 : 0;
          masks[i + j] = rank < n;
        }
      } else {  // large groups (rare: N:M sparsity uses m <= 16): the same ranking, keys re-read (L1)
        for (int j = 0; j < r; ++j) {
          const Key kj = key_of(scores[i + j]);
          int rank = 0;
          for (int l = 0; l < r; ++l) {
            const Key kl = key_of(scores[i + l]);
            rank += (kl > kj || (kl == kj && l < j)) ? 1 : 0;
          }
          masks[i + j] = rank < n;
        }
      }
    }
  }
};

// The scores as contiguous tensors of one dtype on one CUDA device (mixed dtypes widen exactly:
// fp64 if any is fp64, else fp32). The usual single-dtype contiguous list is used as is.
std::vector<at::Tensor> common_scores(const char* op, at::TensorList scores) {
  TORCH_CHECK(!scores.empty(), op, ": empty list of scores");
  const auto device = scores[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": scores[0] is on ", device, "; the cuda backend needs CUDA tensors");
  bool same = true;
  bool any_double = false;
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& s = scores[i];
    TORCH_CHECK(s.device() == device, op, ": scores[", i, "] is on ", s.device(), ", expected ", device);
    TORCH_CHECK(is_supported_float(s.scalar_type()), op, ": scores[", i, "] has dtype ", s.scalar_type(),
                "; supported: float32, float64, float16, bfloat16");
    same = same && s.scalar_type() == scores[0].scalar_type();
    any_double = any_double || s.scalar_type() == at::kDouble;
  }
  const auto dtype = same ? scores[0].scalar_type() : (any_double ? at::kDouble : at::kFloat);
  std::vector<at::Tensor> out;
  out.reserve(scores.size());
  for (const auto& s : scores) out.push_back(s.to(dtype).contiguous());
  return out;
}

std::vector<at::Tensor> topk_mask_cuda(at::TensorList scores, int64_t k) {
  const auto s = common_scores("topk_mask", scores);
  int64_t total = 0;
  for (const auto& t : s) total += t.numel();
  TORCH_CHECK(k >= 0 && k <= total, "topk_mask: k=", k, " outside [0, ", total, "]");
  const auto opts = s[0].options().dtype(at::kBool);
  std::vector<at::Tensor> masks;
  masks.reserve(s.size());
  for (const auto& t : s) masks.push_back(k == 0 ? at::zeros(t.sizes(), opts) : at::empty(t.sizes(), opts));
  if (k == 0) return masks;
  const c10::cuda::CUDAGuard guard(s[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floats(s[0].scalar_type(), "topk_mask", [&](auto tag) {
    using T = decltype(tag);
    using Key = key_type<T>;
    using State = TopkState<Key>;
    const int64_t words = (sizeof(State) + sizeof(int64_t) - 1) / sizeof(int64_t);
    at::Tensor state_buf = at::zeros({words}, s[0].options().dtype(at::kLong));
    auto* state = reinterpret_cast<State*>(state_buf.data_ptr());
    for (int digit = 0; digit < static_cast<int>(sizeof(Key)); ++digit) {
      multi_tensor_apply<HistogramFunctor<T>>({s}, {}, HistogramFunctor<T>{state, digit});
      SAM_KERNELS_LAUNCH(1, 1, 0, stream, radix_select_kernel<Key>)(state, digit, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t chunks = count_chunks(s);
    at::Tensor counts = at::empty({chunks}, s[0].options().dtype(at::kLong));
    auto* counts_ptr = reinterpret_cast<long long*>(counts.data_ptr());
    multi_tensor_apply<TieCountFunctor<T>>({s}, {}, TieCountFunctor<T>{state, counts_ptr});
    SAM_KERNELS_LAUNCH(1, kBlockSize, 0, stream, exclusive_scan_kernel)(counts_ptr, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    multi_tensor_apply<MarkFunctor<T>>({s, masks}, {}, MarkFunctor<T>{state, counts_ptr});
  });
  return masks;
}

std::vector<at::Tensor> nm_mask_cuda(at::TensorList scores, int64_t n, int64_t m) {
  TORCH_CHECK(m >= 1 && n >= 0 && n <= m, "nm_mask: need 0 <= n <= m and m >= 1, got n=", n, " m=", m);
  TORCH_CHECK(m <= std::numeric_limits<int>::max(), "nm_mask: m=", m, " is too large");
  const auto s = common_scores("nm_mask", scores);
  std::vector<at::Tensor> masks;
  std::vector<int64_t> cols;
  masks.reserve(s.size());
  cols.reserve(s.size());
  for (const auto& t : s) {
    masks.push_back(at::empty(t.sizes(), t.options().dtype(at::kBool)));
    // reference.nm_groups: (rows, numel / rows) with rows = size(0) for dim >= 2, else one row.
    const int64_t rows = (t.dim() <= 1 || t.numel() == 0) ? 1 : t.size(0);
    cols.push_back(t.numel() / rows);
  }
  const c10::cuda::CUDAGuard guard(s[0].device());
  dispatch_floats(s[0].scalar_type(), "nm_mask", [&](auto tag) {
    using T = decltype(tag);
    multi_tensor_apply<NmFunctor<T>>({s, masks}, cols, NmFunctor<T>{static_cast<int>(n), static_cast<int>(m)});
  });
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("topk_mask", &topk_mask_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
}

}  // namespace sam_kernels::cuda
