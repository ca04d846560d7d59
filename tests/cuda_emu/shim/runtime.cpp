// The CPU emulation's runtime: a grid runs its blocks one after another on the calling thread,
// and a block's threads as cooperative fibers that switch only at __syncthreads(): a dozen
// instructions on x86-64 (ucontext's swapcontext, elsewhere, makes a system call per switch).
//
// CUDA_EMU_THREAD_ORDER (read at every launch) picks the order in which the threads of a block
// run between two barriers: forward (default), reverse, or shuffle[:seed] (a new permutation per
// barrier phase). Code without races between barriers gives the same bits in every order.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define CUDA_EMU_ASAN 1
#endif

namespace cuda_emu {

thread_local uint3 thread_idx{};
thread_local uint3 block_idx{};
thread_local dim3 block_dim{};
thread_local dim3 grid_dim{};

namespace {

#ifdef CUDA_EMU_ASAN
constexpr size_t kStackBytes = size_t{1} << 20;
#else
constexpr size_t kStackBytes = size_t{256} << 10;  // a thread copies its kernel arguments (<= 32 KB) here
#endif

enum class State { kRunnable, kAtBarrier, kDone, kFaulted };

#if defined(__x86_64__)
// A suspended fiber: its stack pointer; the callee-saved registers and the SSE/x87 control words
// are on its stack (System V ABI: everything else is caller-saved across the switch call).
struct Context {
  void* sp = nullptr;
};

extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");

// A context that starts entry() on [stack, stack + size) as cuda_emu_switch resumes it.
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
  *--sp = 0;                                   // entry's return address (it never returns)
  *--sp = reinterpret_cast<uint64_t>(entry);   // popped by `ret`: entry starts with rsp % 16 == 8
  for (int r = 0; r < 6; ++r) *--sp = 0;       // rbp (0 ends frame-pointer unwinding), rbx, r12-r15
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--sp = (uint64_t{fpcw} << 32) | mxcsr;      // this thread's rounding modes
  c.sp = sp;
}

void switch_context(Context& from, const Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  TORCH_CHECK(getcontext(&c.uc) == 0, "cuda_emu: getcontext failed");
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) {
  TORCH_CHECK(swapcontext(&from.uc, &to.uc) == 0, "cuda_emu: swapcontext failed");
}
#endif

struct Fiber {
  Context context;
  char* stack = nullptr;  // kStackBytes above one guard page
  State state = State::kDone;
};

// Launch statistics since the last reset (the tests check which table size a call used).
struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t max_param_bytes = 0;
};

struct Scheduler {
  std::deque<Fiber> fibers;  // never moved (a ucontext_t points into itself)
  Context host;
  int current = -1;  // the running thread, -1 on the host
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
#ifdef CUDA_EMU_ASAN
  void* host_fake_stack = nullptr;
  const void* host_stack_bottom = nullptr;
  size_t host_stack_size = 0;
#endif
  Stats stats;
  std::string misaligned;  // first misaligned access seen in the current launch

  ~Scheduler() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (auto& f : fibers)
      if (f.stack != nullptr) munmap(f.stack - page, kStackBytes + page);
  }
};

thread_local Scheduler sched;

void fiber_main();

// To fiber `tid` from the host, and back.
void resume(int tid) {
  Fiber& f = sched.fibers[tid];
  sched.current = tid;
  thread_idx = uint3{static_cast<unsigned int>(tid), 0, 0};
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&sched.host_fake_stack, f.stack, kStackBytes);
#endif
  switch_context(sched.host, f.context);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(sched.host_fake_stack, nullptr, nullptr);
#endif
  sched.current = -1;
}

void yield_to_host(bool finished) {
  Fiber& f = sched.fibers[sched.current];
#ifdef CUDA_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, sched.host_stack_bottom, sched.host_stack_size);
#endif
  switch_context(f.context, sched.host);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &sched.host_stack_bottom, &sched.host_stack_size);
#endif
}

void fiber_main() {
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &sched.host_stack_bottom, &sched.host_stack_size);
#endif
  sched.body(sched.ctx);
  sched.fibers[sched.current].state = State::kDone;
  yield_to_host(/*finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

void ensure_fibers(size_t n) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (sched.fibers.size() < n) {
    Fiber f;
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "cuda_emu: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // an overflowing thread faults instead of corrupting its neighbour
    f.stack = static_cast<char*>(mem) + page;
    sched.fibers.push_back(f);
  }
}

struct Order {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  uint64_t seed = 0;
};

Order thread_order() {
  const char* env = std::getenv("CUDA_EMU_THREAD_ORDER");
  Order o;
  if (env == nullptr || *env == '\0' || std::strcmp(env, "forward") == 0) return o;
  if (std::strcmp(env, "reverse") == 0) {
    o.kind = Order::kReverse;
    return o;
  }
  if (std::strncmp(env, "shuffle", 7) == 0 && (env[7] == '\0' || env[7] == ':')) {
    o.kind = Order::kShuffle;
    o.seed = env[7] == ':' ? std::strtoull(env + 8, nullptr, 10) : 0;
    return o;
  }
  TORCH_CHECK(false, "CUDA_EMU_THREAD_ORDER=", env, ": use forward, reverse or shuffle[:seed]");
}

// Runs one block to completion; returns an empty string, or why the block is wrong.
std::string run_block(unsigned int threads, const Order& order, std::mt19937_64& rng) {
  for (unsigned int t = 0; t < threads; ++t) {
    Fiber& f = sched.fibers[t];
#ifdef CUDA_EMU_ASAN
    // A fiber's frames never return (it is switched away from), so their redzones stay poisoned.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    make_context(f.context, f.stack, kStackBytes, fiber_main);
    f.state = State::kRunnable;
  }
  std::vector<int> ids(threads);
  std::iota(ids.begin(), ids.end(), 0);
  if (order.kind == Order::kReverse) std::reverse(ids.begin(), ids.end());
  for (int64_t phase = 0;; ++phase) {
    if (order.kind == Order::kShuffle) std::shuffle(ids.begin(), ids.end(), rng);
    for (const int t : ids) {
      if (sched.fibers[t].state == State::kRunnable) resume(t);
      if (sched.fibers[t].state == State::kFaulted) return sched.misaligned;
    }
    unsigned int waiting = 0;
    std::string exited;
    for (unsigned int t = 0; t < threads; ++t) {
      if (sched.fibers[t].state == State::kAtBarrier) {
        ++waiting;
      } else if (exited.size() < 60) {
        exited += (exited.empty() ? "" : ", ") + std::to_string(t);
      }
    }
    if (waiting == 0) return {};
    if (waiting < threads) {
      return "__syncthreads() number " + std::to_string(phase + 1) + " reached by " + std::to_string(waiting) +
             " of the block's " + std::to_string(threads) + " threads (threads that had exited: " + exited +
             (exited.size() >= 60 ? ", ..." : "") + "); undefined behaviour on a GPU";
    }
    for (unsigned int t = 0; t < threads; ++t) sched.fibers[t].state = State::kRunnable;
  }
}

}  // namespace

void syncthreads() {
  TORCH_CHECK(sched.current >= 0, "cuda_emu: __syncthreads() called outside a kernel");
  sched.fibers[sched.current].state = State::kAtBarrier;
  yield_to_host(/*finished=*/false);
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t param_bytes, bool thread0_only, void (*body)(void*),
              void* ctx) {
  TORCH_CHECK(sched.current < 0, "cuda_emu: a kernel launched from inside a kernel");
  TORCH_CHECK(grid.y == 1 && grid.z == 1 && block.y == 1 && block.z == 1,
              "cuda_emu: only one-dimensional grids and blocks are emulated");
  TORCH_CHECK(block.x >= 1 && block.x <= 1024, "cuda_emu: ", kernel, ": ", block.x, " threads per block");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647u, "cuda_emu: ", kernel, ": grid of ", grid.x, " blocks");
  TORCH_CHECK(param_bytes <= 32764, "cuda_emu: ", kernel, ": ", param_bytes, " bytes of kernel parameters");
  const Order order = thread_order();
  std::mt19937_64 rng(order.seed);
  ensure_fibers(block.x);
  sched.body = body;
  sched.ctx = ctx;
  sched.misaligned.clear();
  grid_dim = grid;
  block_dim = block;
  sched.stats.launches += 1;
  sched.stats.blocks += grid.x;
  sched.stats.max_param_bytes = std::max<int64_t>(sched.stats.max_param_bytes, static_cast<int64_t>(param_bytes));
  for (unsigned int b = 0; b < grid.x; ++b) {
    block_idx = uint3{b, 0, 0};
    const std::string error = run_block(thread0_only ? 1 : block.x, order, rng);
    TORCH_CHECK(error.empty(), "cuda_emu: ", kernel, ", block ", b, ": ", error);
  }
}

}  // namespace cuda_emu

// ----------------------------------------------------------------------------- CUDA runtime API
cudaError_t cudaDriverGetVersion(int* version) {
  *version = 12080;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) { return error == cudaSuccess ? "no error" : "error"; }

#ifdef CUDA_EMU_ALIGNMENT_HANDLER
// The kernels are compiled with -fsanitize=alignment and no sanitizer runtime: GCC calls this
// before an access through a pointer not aligned for its type (a 16-byte vector load off the
// 16-byte grid faults on a GPU; on x86 it may read the right bytes, or fault if the compiler
// chose an aligned instruction). The thread stops there, never resumed, and the launch fails.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation location;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};
}  // namespace

extern "C" void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, uintptr_t pointer) {
  if (!cuda_emu::sched.misaligned.empty()) return;
  const uintptr_t alignment = uintptr_t{1} << data->log_alignment;
  if (pointer % alignment == 0) return;  // not an alignment report
  cuda_emu::sched.misaligned = std::string("misaligned access (") + std::to_string(alignment) +
                               "-byte type " + data->type->name + " at address " + std::to_string(pointer) +
                               ") in " + data->location.file + ":" + std::to_string(data->location.line) +
                               " by thread " + std::to_string(cuda_emu::thread_idx.x);
  if (cuda_emu::sched.current >= 0) {
    cuda_emu::sched.fibers[cuda_emu::sched.current].state = cuda_emu::State::kFaulted;
    cuda_emu::yield_to_host(/*finished=*/true);
  }
}

extern "C" void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* data, uintptr_t pointer) {
  __ubsan_handle_type_mismatch_v1(data, pointer);
}
#endif

// ----------------------------------------------------------------------------- harness ops
namespace {
// [launches, blocks, largest kernel-parameter size in bytes] since the last call; resets them.
std::vector<int64_t> take_launch_stats() {
  const auto s = cuda_emu::sched.stats;
  cuda_emu::sched.stats = {};
  return {s.launches, s.blocks, s.max_param_bytes};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(cuda_emu, m) {
  m.def("take_launch_stats() -> int[]", &take_launch_stats);
}
