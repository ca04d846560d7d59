// Emulation stand-in for cub::BlockScan<T, BLOCK_DIM_X>::ExclusiveSum over integers (the sources
// scan counts only, so the order of additions does not matter). Every thread gets its
// exclusive prefix (0 for thread 0) and, when asked, the block total. One barrier: the values are
// read after it, so reusing TempStorage needs the caller's __syncthreads(), as with CUB.
#pragma once

#include <type_traits>

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockScan {
  static_assert(std::is_integral_v<T>, "the emulated BlockScan scans integers only");

 public:
  struct TempStorage {
    T items[BLOCK_DIM_X];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output) {
    T total;
    ExclusiveSum(input, output, total);
  }

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    const unsigned int tid = threadIdx.x;
    storage_.items[tid] = input;
    __syncthreads();
    T before = 0;
    T total = 0;
    for (unsigned int t = 0; t < BLOCK_DIM_X; ++t) {
      if (t == tid) before = total;
      total += storage_.items[t];
    }
    output = before;
    block_aggregate = total;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
