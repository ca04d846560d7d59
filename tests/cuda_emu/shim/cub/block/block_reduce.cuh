// Emulation stand-in for cub::BlockReduce<T, BLOCK_DIM_X>::Sum with CUB's default algorithm
// (BLOCK_REDUCE_WARP_REDUCTIONS) and its order of additions: in each warp of 32 threads a
// shuffle-down tree with offsets 1, 2, 4, 8, 16 (lane i adds lane i + offset's value as it was
// before the step), then thread 0 folds the warp totals in warp order. One barrier, as CUB's,
// so reusing TempStorage needs the caller's __syncthreads(). Threads other than 0 get a
// poisoned value (NaN for floats): CUB promises the total to thread 0 only.
#pragma once

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockReduce {
  static_assert(BLOCK_DIM_X % 32 == 0, "the emulated BlockReduce handles whole warps only");

 public:
  struct TempStorage {
    T items[BLOCK_DIM_X];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  T Sum(T input) {
    const unsigned int tid = threadIdx.x;
    storage_.items[tid] = input;
    __syncthreads();
    if (tid != 0) return ::cuda_emu::poison<T>();
    T total{};
    for (int warp = 0; warp < BLOCK_DIM_X / 32; ++warp) {
      T lanes[32];
      for (int lane = 0; lane < 32; ++lane) lanes[lane] = storage_.items[warp * 32 + lane];
      for (int offset = 1; offset < 32; offset *= 2) {
        // Ascending lanes read lane + offset before it is updated: a simultaneous shuffle.
        for (int lane = 0; lane + offset < 32; ++lane) lanes[lane] = lanes[lane] + lanes[lane + offset];
      }
      total = warp == 0 ? lanes[0] : total + lanes[0];
    }
    return total;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
