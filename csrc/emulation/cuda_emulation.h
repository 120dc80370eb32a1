// Host emulation of the subset of CUDA the kernels of csrc/cuda use, so the host C++
// compiler builds the very same kernel sources and the tests run them on CPU (docs/spec.md §6).
//
// Execution model:
// * A launch runs its blocks one after another; the threads of a block are OS threads
//   (kept in a pool across launches, each running its thread of every block).
// * `__syncthreads()` is a std::barrier of the block; warp collectives (shuffles,
//   ballots, `__syncwarp`) go through a per-warp exchange buffer guarded by a
//   barrier of the warp's 32 lanes.
// * `__shared__` is function-static storage: one block runs at a time, and launches
//   are serialised by a process-wide mutex, so the storage is never shared by two
//   blocks.
// * atomics are std::atomic_ref; `threadIdx`/`blockIdx`/`blockDim`/`gridDim` are
//   thread-local.
//
// What it checks beyond running the code: launch configurations that CUDA rejects,
// blocks that are not whole warps, partial-warp masks, and divergent barriers or warp
// collectives (threads of a block, or lanes of a warp, that did not execute the same
// number of them: undefined behaviour on a GPU; here the grid stops with an error
// instead of hanging). What it does NOT check (no data races between threads, no
// memory model, no coalescing, no bank conflicts, no occupancy) is listed in
// csrc/emulation/README.md.
//
// Self-contained (standard C++20 only), so a test can compile a kernel against it
// without torch.
#pragma once

#if !defined(PROTOSEG_EMULATION)
#error "cuda_emulation.h is the host build of CUDA kernels; define PROTOSEG_EMULATION"
#endif

#include <array>
#include <pthread.h>

#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers -----------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---- built-in vector types and variables -----------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

using cudaStream_t = struct EmulatedStream*;
constexpr int warpSize = 32;

namespace protoseg::emulation {

constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// Floats of one warp's matrix buffer: the a and b operands of a 16×16×16 wmma::mma_sync.
constexpr int kMatrixSlots = 2 * 16 * 16;

// Thrown inside a kernel thread for a construct the emulation refuses; the launch
// turns it into a std::runtime_error on the calling thread.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The lanes of one warp: a barrier for collectives and two banks of exchange slots,
// used alternately, so one barrier per collective suffices (a lane can only rewrite a
// bank after every lane passed the next collective's barrier, i.e. finished reading).
struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  std::array<std::array<std::uint64_t, kWarpSize>, 2> slots{};
  std::array<std::array<float, kMatrixSlots>, 2> matrices{};  // wmma operands (wmma_emulation.h)
};

// Per-block synchronisation state, rebuilt before every block.
struct BlockSync {
  explicit BlockSync(int threads) : barrier(threads) {
    for (int first = 0; first < threads; first += kWarpSize) warps.emplace_back(std::make_unique<Warp>(kWarpSize));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

// What one OS thread (one CUDA thread) does, counted to detect divergence.
struct ThreadRecord {
  std::uint64_t block_barriers = 0;
  std::uint64_t warp_collectives = 0;
};

struct ThreadState {
  BlockSync* sync = nullptr;
  ThreadRecord* record = nullptr;
  int linear = 0;  // linear thread index within the block
};

inline thread_local ThreadState current;

inline int lane_id() { return current.linear % kWarpSize; }
inline Warp& current_warp() { return *current.sync->warps[current.linear / kWarpSize]; }

inline void require_full_mask(unsigned int mask, const char* what) {
  if (mask != kFullMask) {
    throw KernelError(std::string(what) + ": only full-warp masks (0xffffffff) are emulated");
  }
}

// The exchange bank of the calling lane's next warp collective (counted per lane).
inline std::array<std::uint64_t, kWarpSize>& next_bank() {
  return current_warp().slots[current.record->warp_collectives++ & 1];
}

// The matrix buffer of the calling lane's next warp collective (an mma_sync).
inline std::array<float, kMatrixSlots>& next_matrix_bank() {
  return current_warp().matrices[current.record->warp_collectives++ & 1];
}

// Every lane publishes `value` and reads lane `source`'s; `source` out of the warp
// (or out of the lane's width segment, decided by the caller) keeps the own value.
template <typename T>
T exchange(T value, int source) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t),
                "warp exchange of types up to 8 bytes");
  auto& bank = next_bank();
  std::memcpy(&bank[lane_id()], &value, sizeof(T));
  current_warp().barrier.arrive_and_wait();  // every lane has written
  T result = value;
  if (source >= 0 && source < kWarpSize) std::memcpy(&result, &bank[source], sizeof(T));
  return result;
}

inline void check_width(int width) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    throw KernelError("warp shuffle width must be a power of two in [1, 32]");
  }
}

// ---- launch ---------------------------------------------------------------------

// OS threads kept across launches (starting 256 threads per launch would cost more
// than most emulated kernels). run() hands job(t) to threads 0..count-1 and returns
// when all of them returned. Launches are serialised, so one job runs at a time.
class WorkerPool {
 public:
  void run(int count, const std::function<void(int)>& job) {
    while (int(workers_.size()) < count) {
      auto worker = std::make_unique<Worker>();
      worker->thread = std::thread(&WorkerPool::serve, this, worker.get(), int(workers_.size()));
      workers_.push_back(std::move(worker));
    }
    std::latch done(count);
    job_ = &job;
    done_ = &done;
    for (int t = 0; t < count; ++t) workers_[t]->start.release();
    done.wait();
  }

  // In a forked child the workers do not exist: forget them (never joined, so leaked)
  // and start new ones on the next launch.
  void forget_workers() {
    for (auto& worker : workers_) worker.release();
    workers_.clear();
  }

 private:
  struct Worker {
    std::binary_semaphore start{0};
    std::thread thread;
  };

  void serve(Worker* worker, int index) {
    for (;;) {
      worker->start.acquire();
      (*job_)(index);
      done_->count_down();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::latch* done_ = nullptr;
};

inline std::mutex& launch_mutex();

// The pool lives as long as the process (its threads block forever between launches).
// A fork waits for the running launch, and the child starts with an empty pool.
inline WorkerPool& worker_pool() {
  static WorkerPool* pool = [] {
    pthread_atfork([] { launch_mutex().lock(); }, [] { launch_mutex().unlock(); },
                   [] {
                     worker_pool().forget_workers();
                     launch_mutex().unlock();
                   });
    return new WorkerPool();
  }();
  return *pool;
}

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline void check_launch_configuration(dim3 grid, dim3 block) {
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > 1024 || block.x > 1024 ||
      block.y > 1024 || block.z > 64) {
    throw std::invalid_argument("emulated launch: invalid block dimensions (CUDA: at most 1024 threads, z <= 64)");
  }
  if (threads % kWarpSize != 0) {
    throw std::invalid_argument("emulated launch: blocks must be whole warps (a multiple of 32 threads)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    throw std::invalid_argument("emulated launch: invalid grid dimensions (CUDA: x < 2^31, y and z <= 65535)");
  }
}

// Runs `grid` blocks of `block` threads of `kernel(params...)` and returns when all
// finished. Kernel arguments are converted to the parameter types once, as a CUDA
// launch copies them. Errors (a refused construct, a divergent barrier, an exception
// in a kernel thread) stop the grid and are rethrown here.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count mismatch");
  check_launch_configuration(grid, block);
  WorkerPool& pool = worker_pool();  // before taking the lock: it registers the fork handlers
  const std::lock_guard<std::mutex> one_grid_at_a_time(launch_mutex());
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const int threads = int(block.x * block.y * block.z);
  const std::uint64_t blocks = std::uint64_t(grid.x) * grid.y * grid.z;

  std::vector<ThreadRecord> records(threads);
  std::optional<BlockSync> sync;
  std::string error;  // first error; written under error_mutex, read after a barrier
  std::mutex error_mutex;
  bool stop = false;

  // Runs with all threads parked between two blocks: check that every thread passed
  // the same barriers and warp collectives, then rebuild the synchronisation state.
  auto between_blocks = [&]() noexcept {
    for (int t = 0; t < threads && error.empty(); ++t) {
      const int warp_first = t - t % kWarpSize;
      if (records[t].block_barriers != records[0].block_barriers) {
        error = "divergent __syncthreads: threads of a block executed different numbers of barriers";
      } else if (records[t].warp_collectives != records[warp_first].warp_collectives) {
        error = "divergent warp collective: lanes of a warp executed different numbers of shuffles/ballots";
      }
    }
    stop = !error.empty();
    for (auto& r : records) r = ThreadRecord{};
    sync.emplace(threads);
  };
  std::barrier block_boundary(threads, between_blocks);
  sync.emplace(threads);

  const std::function<void(int)> worker = [&](int linear) {
    current.linear = linear;
    current.record = &records[linear];
    threadIdx = uint3{linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y)};
    blockDim = block;
    gridDim = grid;
    for (std::uint64_t b = 0; b < blocks; ++b) {
      if (stop) break;  // read after a barrier: every thread sees the same value
      blockIdx = uint3{unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (std::uint64_t(grid.x) * grid.y))};
      current.sync = &*sync;
      try {
        std::apply(kernel, params);
      } catch (const std::exception& exc) {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = exc.what();
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = "unknown exception in an emulated kernel thread";
      }
      // A finished thread no longer takes part in its block's barriers, as on a GPU
      // where exited threads do not hold a barrier back; the counts above still
      // flag a barrier that only some threads reached.
      current.sync->barrier.arrive_and_drop();
      current_warp().barrier.arrive_and_drop();
      block_boundary.arrive_and_wait();
    }
  };

  pool.run(threads, worker);
  if (!error.empty()) throw std::runtime_error("emulated CUDA kernel failed: " + error);
}

}  // namespace protoseg::emulation

// ---- synchronisation and warp collectives ------------------------------------------

inline void __syncthreads() {
  ++protoseg::emulation::current.record->block_barriers;
  protoseg::emulation::current.sync->barrier.arrive_and_wait();
}

inline void __syncwarp(unsigned int mask = protoseg::emulation::kFullMask) {
  protoseg::emulation::require_full_mask(mask, "__syncwarp");
  ++protoseg::emulation::current.record->warp_collectives;
  protoseg::emulation::current_warp().barrier.arrive_and_wait();
}

template <typename T>
T __shfl_sync(unsigned int mask, T value, int source_lane, int width = warpSize) {
  using namespace protoseg::emulation;
  require_full_mask(mask, "__shfl_sync");
  check_width(width);
  const int base = lane_id() - lane_id() % width;
  return exchange(value, base + (source_lane % width + width) % width);
}

template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  using namespace protoseg::emulation;
  require_full_mask(mask, "__shfl_up_sync");
  check_width(width);
  const int lane = lane_id();
  const bool inside = lane % width >= int(delta);
  return exchange(value, inside ? lane - int(delta) : lane);
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  using namespace protoseg::emulation;
  require_full_mask(mask, "__shfl_down_sync");
  check_width(width);
  const int lane = lane_id();
  const bool inside = lane % width + int(delta) < width;
  return exchange(value, inside ? lane + int(delta) : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = warpSize) {
  using namespace protoseg::emulation;
  require_full_mask(mask, "__shfl_xor_sync");
  check_width(width);
  const int lane = lane_id();
  const int source = lane ^ lane_mask;
  const bool inside = source / width == lane / width;
  return exchange(value, inside ? source : lane);
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  using namespace protoseg::emulation;
  require_full_mask(mask, "__ballot_sync");
  auto& bank = next_bank();
  bank[lane_id()] = predicate != 0;
  current_warp().barrier.arrive_and_wait();
  unsigned int bits = 0;
  for (int l = 0; l < kWarpSize; ++l) bits |= unsigned(bank[l] != 0) << l;
  return bits;
}

inline int __any_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// ---- integer intrinsics ------------------------------------------------------------

inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }

// ---- memory ordering and atomics ---------------------------------------------------

inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __ldg(const T* address) {
  return *address;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}

template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}

template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value, whether or not the exchange happened
}

template <typename T>
T atomicMax(T* address, T value) {
  static_assert(std::is_integral_v<T>, "atomicMax is integral in CUDA");
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

template <typename T>
T atomicMin(T* address, T value) {
  static_assert(std::is_integral_v<T>, "atomicMin is integral in CUDA");
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old > value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

// ---- half precision storage types --------------------------------------------------
// Storage only, as the kernels use them: converted to float on load and rounded to
// nearest-even on store, bit-compatible with at::Half / at::BFloat16.

struct __half {
  std::uint16_t bits;
};

struct __nv_bfloat16 {
  std::uint16_t bits;
};

inline float __half2float(__half value) {
  _Float16 h;
  std::memcpy(&h, &value.bits, sizeof(h));
  return float(h);
}

inline __half __float2half_rn(float value) {
  const _Float16 h = static_cast<_Float16>(value);  // IEEE conversion: round to nearest even
  __half out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
}

inline float __bfloat162float(__nv_bfloat16 value) {
  const std::uint32_t bits = std::uint32_t(value.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{std::uint16_t((bits >> 16) | 0x40u)};  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{std::uint16_t(bits >> 16)};
}

// ---- warp matrix functions (nvcuda::wmma) -------------------------------------------
#include "emulation/wmma_emulation.h"
