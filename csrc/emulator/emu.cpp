// The emulator's scheduler: fibers for CUDA threads (see emu.h). Fibers are started with
// makecontext / swapcontext and switched with _setjmp / _longjmp, which skips the signal-mask
// system call swapcontext makes at every switch.

#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "emu.h"

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

namespace {

cudaError_t last_error = cudaSuccess;

enum class State { kRunnable, kBarrier, kShuffle, kCollective, kDone };

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable:
      return "running";
    case State::kBarrier:
      return "__syncthreads";
    case State::kShuffle:
      return "a warp shuffle";
    case State::kCollective:
      return "a warp-wide operation";
    case State::kDone:
      return "returned";
  }
  return "?";
}

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  bool started = false;
  State state = State::kRunnable;
  uint3 index{0, 0, 0};
  // the pending shuffle
  unsigned mask = 0;
  uint64_t bits = 0;
  int src_lane = 0;
  const char* op = nullptr;
  uint64_t result = 0;
  const void* barrier_site = nullptr;  // the __syncthreads call it waits at
  // the pending warp-wide operation
  const void* mine = nullptr;
  size_t bytes = 0;
  void* all = nullptr;
  std::unique_ptr<char[]> stack;
};

struct Block {
  std::vector<Fiber> fibers;
  size_t fibers_in_use = 0;  // the block's threads: fibers[0, fibers_in_use)
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  jmp_buf scheduler;
  std::string fault;  // set by a fiber whose body threw
};

Block block;
std::vector<std::pair<char*, size_t>> shared_regions;  // every __shared__ array met so far
unsigned schedule = 0;
bool warps_apart = false;

// Leaves the current fiber for the scheduler; returns when the scheduler resumes it.
void yield() {
  Fiber* self = block.current;
  if (!_setjmp(self->resume)) _longjmp(block.scheduler, 1);
}

void fiber_main() {
  Fiber* self = block.current;
  try {
    (*block.body)();
  } catch (const std::exception& e) {
    if (block.fault.empty()) block.fault = e.what();
  } catch (...) {
    if (block.fault.empty()) block.fault = "unknown exception";
  }
  self->state = State::kDone;
  _longjmp(block.scheduler, 1);
}

void resume(Fiber& f) {
  block.current = &f;
  threadIdx = f.index;
  if (_setjmp(block.scheduler)) return;  // the fiber yielded or finished
  if (!f.started) {
    f.started = true;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    ucontext_t here;
    swapcontext(&here, &f.context);  // never returns here: the fiber longjmps to scheduler
    std::abort();
  }
  _longjmp(f.resume, 1);
}

std::string where(const dim3& b) {
  return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) +
         ")";
}

std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.index.x) + "," + std::to_string(f.index.y) + "," +
         std::to_string(f.index.z) + ")";
}

std::vector<unsigned> order(unsigned n, unsigned salt) {
  std::vector<unsigned> idx(n);
  std::iota(idx.begin(), idx.end(), 0u);
  if (schedule == 1) {
    std::reverse(idx.begin(), idx.end());
  } else if (schedule > 1) {
    std::mt19937 rng(schedule * 2654435761u + salt);
    std::shuffle(idx.begin(), idx.end(), rng);
  }
  return idx;
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// Completes the warp-wide operation of warp `w` (from `first` to `end`), whose live lanes `live`
// all wait at one.
void complete_collective(const dim3& b, size_t first, size_t end, unsigned live) {
  const Fiber& lead = block.fibers[first];
  if (end - first != 32 || live != 0xffffffffu) {
    throw std::runtime_error("emulator: " + where(b) + " " + thread_name(lead) + ": " + lead.op +
                             " needs all 32 lanes of the warp (live lanes " + hex(live) + ")");
  }
  for (size_t t = first; t < end; ++t) {
    const Fiber& f = block.fibers[t];
    if (std::strcmp(f.op, lead.op) != 0 || f.bytes != lead.bytes) {
      throw std::runtime_error("emulator: " + where(b) + ": " + thread_name(lead) + " at " +
                               lead.op + " but " + thread_name(f) + " at " + f.op);
    }
  }
  for (size_t t = first; t < end; ++t) {
    char* out = static_cast<char*>(block.fibers[t].all);
    for (size_t src = first; src < end; ++src) {
      std::memcpy(out + (src - first) * lead.bytes, block.fibers[src].mine, lead.bytes);
    }
  }
  for (size_t t = first; t < end; ++t) block.fibers[t].state = State::kRunnable;
}

// Completes the shuffle (or warp-wide operation) of warp `w` if every live thread of it waits
// at one; true if it did.
bool complete_shuffle(const dim3& b, size_t w) {
  const size_t first = w * 32;
  const size_t end = std::min(block.fibers_in_use, first + 32);
  unsigned live = 0;  // lanes that have not returned
  bool shuffles = false;
  bool collectives = false;
  for (size_t t = first; t < end; ++t) {
    const Fiber& f = block.fibers[t];
    if (f.state == State::kDone) continue;
    live |= 1u << (t - first);
    if (f.state == State::kShuffle) shuffles = true;
    else if (f.state == State::kCollective) collectives = true;
    else return false;
  }
  if (!shuffles && !collectives) return false;
  if (shuffles && collectives) {
    throw std::runtime_error("emulator: " + where(b) + ": lanes of warp " + std::to_string(w) +
                             " wait at a shuffle and at a warp-wide operation");
  }
  if (collectives) {
    complete_collective(b, first, end, live);
    return true;
  }
  for (size_t t = first; t < end; ++t) {
    Fiber& f = block.fibers[t];
    if (f.state != State::kShuffle) continue;
    const int lane = static_cast<int>(t - first);
    if ((f.mask & live) != f.mask || !(f.mask & (1u << lane))) {
      throw std::runtime_error("emulator: " + where(b) + " " + thread_name(f) + ": " + f.op +
                               " with mask " + hex(f.mask) +
                               " names lanes that have returned, do not exist or are not the "
                               "caller (live lanes " + hex(live) + ")");
    }
    if (f.src_lane < 0 || f.src_lane >= 32 || !(f.mask & (1u << f.src_lane))) {
      throw std::runtime_error("emulator: " + where(b) + " " + thread_name(f) + ": " + f.op +
                               " reads lane " + std::to_string(f.src_lane) +
                               ", which is not in its mask");
    }
    const Fiber& src = block.fibers[first + f.src_lane];
    if (src.mask != f.mask) {
      throw std::runtime_error("emulator: " + where(b) + " lanes " + std::to_string(lane) +
                               " and " + std::to_string(f.src_lane) +
                               " shuffle with different masks");
    }
    f.result = src.bits;
  }
  for (size_t t = first; t < end; ++t) {
    if (block.fibers[t].state == State::kShuffle) block.fibers[t].state = State::kRunnable;
  }
  return true;
}

// Every thread of the block must reach the same __syncthreads: one that waits at another call,
// or one that has returned, makes a barrier CUDA leaves undefined.
void check_barrier(const dim3& b, unsigned threads, unsigned live) {
  const Fiber* first = nullptr;
  for (unsigned t = 0; t < threads; ++t) {
    const Fiber& f = block.fibers[t];
    if (f.state != State::kBarrier) continue;
    if (first == nullptr) {
      first = &f;
    } else if (f.barrier_site != first->barrier_site) {
      throw std::runtime_error("emulator: " + where(b) + ": " + thread_name(*first) + " and " +
                               thread_name(f) + " wait at different __syncthreads calls");
    }
  }
  if (live != threads) {
    for (unsigned t = 0; t < threads; ++t) {
      if (block.fibers[t].state == State::kDone) {
        throw std::runtime_error("emulator: " + where(b) + ": " + thread_name(*first) +
                                 " waits at __syncthreads after " +
                                 thread_name(block.fibers[t]) + " returned");
      }
    }
  }
}

void run_block(const dim3& b, unsigned threads, unsigned salt) {
  for (const auto& [p, bytes] : shared_regions) std::memset(p, 0xff, bytes);
  block.fibers_in_use = threads;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    f.started = false;
    f.state = State::kRunnable;
    f.index = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
  }
  const unsigned warps = (threads + 31) / 32;
  const std::vector<unsigned> warp_turns = order(warps, salt);
  const std::vector<unsigned> lane_turns = order(32, salt + 1);
  for (;;) {
    for (unsigned w : warp_turns) {
      do {
        for (unsigned lane : lane_turns) {
          const unsigned t = w * 32 + lane;
          if (t < threads && block.fibers[t].state == State::kRunnable) resume(block.fibers[t]);
          if (!block.fault.empty()) {
            throw std::runtime_error("emulator: " + where(b) + ": a thread threw: " + block.fault);
          }
        }
      } while (warps_apart && complete_shuffle(b, w));  // on to this warp's next barrier
    }
    unsigned live = 0;
    unsigned at_barrier = 0;
    for (unsigned t = 0; t < threads; ++t) {
      const State s = block.fibers[t].state;
      live += s != State::kDone;
      at_barrier += s == State::kBarrier;
    }
    if (live == 0) return;
    bool shuffled = false;
    for (unsigned w = 0; w < warps; ++w) shuffled |= complete_shuffle(b, w);
    if (shuffled) continue;
    if (at_barrier == live) {
      check_barrier(b, threads, live);
      for (unsigned t = 0; t < threads; ++t) {
        if (block.fibers[t].state == State::kBarrier) block.fibers[t].state = State::kRunnable;
      }
      continue;
    }
    // Nothing can move: say who waits where.
    std::string msg = "emulator: " + where(b) + ": threads wait where the others cannot follow:";
    int shown = 0;
    for (unsigned t = 0; t < threads && shown < 8; ++t) {
      const Fiber& f = block.fibers[t];
      if (t == 0 || f.state != block.fibers[t - 1].state) {
        msg += " " + thread_name(f) + " at " + state_name(f.state) + ";";
        ++shown;
      }
    }
    throw std::runtime_error(msg);
  }
}

}  // namespace

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return last_error; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

__attribute__((noinline)) void __syncthreads() {
  Fiber* self = block.current;
  self->state = State::kBarrier;
  self->barrier_site = __builtin_return_address(0);
  yield();
}

namespace emu {

void set_schedule(unsigned order, bool apart) {
  schedule = order;
  warps_apart = apart;
}

void warp_collective(const char* op, const void* mine, size_t bytes, void* all) {
  Fiber* self = block.current;
  self->state = State::kCollective;
  self->op = op;
  self->mine = mine;
  self->bytes = bytes;
  self->all = all;
  yield();
}

void shared_region(void* p, size_t bytes) {
  char* start = static_cast<char*>(p);
  for (const auto& region : shared_regions) {
    if (region.first == start) return;
  }
  shared_regions.emplace_back(start, bytes);
  std::memset(start, 0xff, bytes);
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans) {
  const char* p = static_cast<const char*>(row_address);
  bool in_shared = false;
  for (const auto& [start, bytes] : shared_regions) {
    in_shared |= p >= start && p + 16 <= start + bytes;
  }
  if (!in_shared || reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    throw std::runtime_error("emulator: ldmatrix: " + thread_name(*block.current) +
                             " gave an address that is not 16-byte aligned shared memory");
  }
  const void* rows[32];
  warp_collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", &row_address, sizeof row_address,
                  rows);
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      const int row = trans ? 2 * (lane % 4) + j : lane / 4;
      const int col = trans ? lane / 4 : 2 * (lane % 4) + j;
      std::memcpy(&e[j], static_cast<const char*>(rows[8 * i + row]) + 2 * col, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

uint64_t shuffle(unsigned mask, uint64_t bits, int src_lane, const char* op) {
  Fiber* self = block.current;
  self->state = State::kShuffle;
  self->mask = mask;
  self->bits = bits;
  self->src_lane = src_lane;
  self->op = op;
  yield();
  return self->result;
}

void run_grid(dim3 grid, dim3 blk, const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(blk.x) * blk.y * blk.z;
  // The limits of every GPU since sm_30.
  if (threads == 0 || threads > 1024 || blk.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  blockDim = blk;
  gridDim = grid;
  if (block.fibers.size() < threads) {
    block.fibers.resize(threads);
  }
  for (auto& f : block.fibers) {
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
  }
  block.body = &body;
  block.fault.clear();
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (blocks > (1u << 24)) {
    throw std::runtime_error("emulator: grid of " + std::to_string(blocks) +
                             " blocks is too large to emulate");
  }
  const std::vector<unsigned> turns = order(static_cast<unsigned>(blocks), 0x9e3779b9u);
  for (unsigned i : turns) {
    const dim3 b(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
    blockIdx = {b.x, b.y, b.z};
    run_block(b, static_cast<unsigned>(threads), i);
  }
}

}  // namespace emu
