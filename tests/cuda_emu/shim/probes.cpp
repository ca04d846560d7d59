// The harness's own ops (torch.ops.cuda_emu), compiled with the CUDA sources: probes of the
// multi-tensor launcher's chunk and table arithmetic with synthetic sizes (no memory behind the
// tensors), and of the emulated runtime itself (barriers, alignment checks, thread orders).
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <vector>

#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

constexpr int kProbeColumns = 7;

// Records, per block, [tensor, begin, end, aligned, block, blockIdx.x, aux]: thread 0 only, and
// without touching the (fake) tensor memory.
template <int kDepth_, int kIlp_>
struct RecordChunks {
  static constexpr bool kEmulateThreadZeroOnly = true;
  static constexpr int kDepth = kDepth_;
  static constexpr int kIlp = kIlp_;
  uintptr_t base;
  int64_t stride;
  int64_t* rows;
  int64_t* next;

  void operator()(const BlockTensors<kDepth>& t, const ChunkRef& c) const {
    int64_t* row = rows + (*next)++ * kProbeColumns;
    row[0] = static_cast<int64_t>((reinterpret_cast<uintptr_t>(t.ptrs[0]) - base) / stride);
    row[1] = c.begin;
    row[2] = c.end;
    row[3] = c.aligned;
    row[4] = c.block;
    row[5] = blockIdx.x;
    row[6] = c.aux;
  }
};

template <int kDepth, int kIlp>
void plan(const std::vector<at::Tensor>& tensors, at::IntArrayRef aux, bool large, int64_t* rows, uintptr_t base,
          int64_t stride) {
  std::array<at::TensorList, kDepth> lists;
  for (auto& l : lists) l = tensors;
  int64_t next = 0;
  const RecordChunks<kDepth, kIlp> f{base, stride, rows, &next};
  if (large) {
    launch_tables<TensorListMetadata<kDepth, LargeTables>>(lists, aux, f);
  } else {
    launch_tables<TensorListMetadata<kDepth, SmallTables>>(lists, aux, f);
  }
}

template <int kIlp>
void plan_depth(int64_t depth, const std::vector<at::Tensor>& tensors, at::IntArrayRef aux, bool large,
                int64_t* rows, uintptr_t base, int64_t stride) {
  switch (depth) {
    case 1: return plan<1, kIlp>(tensors, aux, large, rows, base, stride);
    case 2: return plan<2, kIlp>(tensors, aux, large, rows, base, stride);
    case 3: return plan<3, kIlp>(tensors, aux, large, rows, base, stride);
    case 4: return plan<4, kIlp>(tensors, aux, large, rows, base, stride);
    case 5: return plan<5, kIlp>(tensors, aux, large, rows, base, stride);
    case 6: return plan<6, kIlp>(tensors, aux, large, rows, base, stride);
    default: TORCH_CHECK(false, "table_plan: depth ", depth, " outside [1, 6]");
  }
}

// The launcher's plan for `depth` lists of tensors of `sizes` elements of `element_size` bytes
// (2: fp16, 4: fp32, 8: fp64), tensor i at storage offset offsets[i] elements from a 16-byte
// aligned address: one row per block, in launch order (see RecordChunks). Nothing is allocated
// but the rows: the tensors' data pointers are fake, 2^36 bytes apart.
at::Tensor table_plan(at::IntArrayRef sizes, at::IntArrayRef offsets, at::IntArrayRef aux, int64_t element_size,
                      int64_t depth, bool large) {
  TORCH_CHECK(offsets.size() == sizes.size(), "table_plan: one offset per tensor");
  const auto dtype = element_size == 2 ? at::kHalf : element_size == 4 ? at::kFloat : at::kDouble;
  TORCH_CHECK(element_size == 2 || element_size == 4 || element_size == 8, "table_plan: element_size 2, 4 or 8");
  constexpr uintptr_t kBase = uintptr_t{1} << 44;
  constexpr int64_t kStride = int64_t{1} << 36;
  std::vector<at::Tensor> tensors;
  int64_t chunks = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    TORCH_CHECK(sizes[i] >= 0 && (sizes[i] + 1) * element_size <= kStride, "table_plan: size ", sizes[i]);
    void* p = reinterpret_cast<void*>(kBase + i * kStride + offsets[i] * element_size);
    tensors.push_back(at::from_blob(p, {sizes[i]}, at::TensorOptions().dtype(dtype)));
    chunks += (sizes[i] + kChunkSize - 1) / kChunkSize;
  }
  at::Tensor rows = at::empty({chunks, kProbeColumns}, at::kLong);
  auto* r = rows.data_ptr<int64_t>();
  switch (element_size) {
    case 2: plan_depth<8>(depth, tensors, aux, large, r, kBase, kStride); break;
    case 4: plan_depth<4>(depth, tensors, aux, large, r, kBase, kStride); break;
    default: plan_depth<2>(depth, tensors, aux, large, r, kBase, kStride); break;
  }
  return rows;
}

// Threads below `arriving` reach a barrier, the others return: the launch must fail.
__global__ void divergent_barrier_kernel(unsigned int arriving) {
  if (threadIdx.x < arriving) __syncthreads();
}

void divergent_barrier(int64_t arriving) {
  SAM_KERNELS_LAUNCH(2, kBlockSize, 0, nullptr, divergent_barrier_kernel)(static_cast<unsigned int>(arriving));
}

// Thread 0 loads src[0..4) as one 16-byte vector (the launcher's aligned path) into out.
__global__ void vector_load_kernel(const float* src, float* out) {
  if (threadIdx.x != 0) return;
  const auto v = load_group<float, 4>(src, 0, 4, /*aligned=*/true);
  for (int k = 0; k < 4; ++k) out[k] = v.v[k];
}

at::Tensor vector_load(const at::Tensor& src) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.numel() >= 4 && src.is_contiguous(), "vector_load: fp32");
  at::Tensor out = at::empty({4}, src.options());
  SAM_KERNELS_LAUNCH(1, 32, 0, nullptr, vector_load_kernel)(src.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// The order in which the threads of one block run in each of `phases` barrier phases.
__global__ void thread_order_kernel(int64_t* out, int phases) {
  static int64_t next;  // one writer at a time: threads switch only at barriers
  if (threadIdx.x == 0) next = 0;
  __syncthreads();
  for (int p = 0; p < phases; ++p) {
    out[next++] = threadIdx.x;
    __syncthreads();
  }
}

at::Tensor thread_order(int64_t phases) {
  at::Tensor out = at::empty({phases, kBlockSize}, at::kLong);
  SAM_KERNELS_LAUNCH(1, kBlockSize, 0, nullptr, thread_order_kernel)(out.data_ptr<int64_t>(), static_cast<int>(phases));
  return out;
}

}  // namespace
}  // namespace sam_kernels::cuda

TORCH_LIBRARY_FRAGMENT(cuda_emu, m) {
  m.def("table_plan(int[] sizes, int[] offsets, int[] aux, int element_size, int depth, bool large) -> Tensor",
        &sam_kernels::cuda::table_plan);
  m.def("divergent_barrier(int arriving) -> ()", &sam_kernels::cuda::divergent_barrier);
  m.def("vector_load(Tensor src) -> Tensor", &sam_kernels::cuda::vector_load);
  m.def("thread_order(int phases) -> Tensor", &sam_kernels::cuda::thread_order);
}
