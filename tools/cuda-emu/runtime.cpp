// The CPU emulator's runtime: fibers and the block scheduler, memory with guard zones, stream queues, graph
// capture and replay, and the CUDA runtime calls priortune uses. See include/emu_cuda.h for what the
// emulation checks and what it cannot prove (no real concurrency or memory model, no hardware rounding
// order, no performance or occupancy, no driver).
#include <sys/mman.h>

#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <set>

#include "cuda.h"
#include "emu_cuda.h"

#ifdef __SANITIZE_ADDRESS__  // AddressSanitizer must be told about fiber stack switches
#include <sanitizer/common_interface_defs.h>
#define ASAN_START(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define ASAN_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define ASAN_START(save, bottom, size) ((void)0)
#define ASAN_FINISH(save, bottom, size) ((void)0)
#endif

using Ops = std::vector<std::pair<std::string, emu::Job>>;
struct CUstream_st {
  unsigned flags = 0;
  bool legacy = false;
  bool capturing = false, invalidated = false;
  int id = 0;
  Ops graph;
};
struct CUgraph_st {
  Ops ops;
};
struct CUgraphExec_st {
  Ops ops;
};
struct CUevent_st {
  double t = 0;
  cudaStream_t s = nullptr;
};

namespace emu {
long long errors = 0, warnings = 0, launches = 0, jobs_run = 0, graph_launches = 0, captured_jobs = 0;
// One host thread at a time: the queue, the allocations and the fibers that run a grid are shared state,
// and the addon calls the runtime from libuv workers and the JS thread (a finalizer's stream teardown)
// at once; the CUDA runtime is thread-safe, so the emulator serialises its calls. Recursive: a job run by a
// wait may call the runtime again.
static std::recursive_mutex emu_mutex;
struct EmuLock {
  std::lock_guard<std::recursive_mutex> guard{emu_mutex};
};

unsigned order_seed = 0;
bool reverse_blocks = false;
static int last_error = cudaSuccess;
static CUstream_st legacy_stream;
static std::set<CUstream_st*> streams;
static std::set<CUgraphExec_st*> live_execs;

void report(bool error, const std::string& msg) {
  (error ? errors : warnings) += 1;
  std::fprintf(stderr, "EMU %s: %s\n", error ? "ERROR" : "warning", msg.c_str());
}
void fatal(const std::string& msg) {
  report(true, msg);
  std::fflush(stdout);
  std::abort();
}

static CUstream_st* S(cudaStream_t s) {
  if (!s) {
    legacy_stream.legacy = true;
    return &legacy_stream;
  }
  if (!streams.count(s)) fatal("use of a destroyed or unknown stream");
  return s;
}
static CUstream_st* capturing_stream() {
  for (CUstream_st* s : streams)
    if (s->capturing) return s;
  return nullptr;
}
static cudaError_t fail(int e) {
  last_error = e;
  return e;
}
// A call that is illegal while a capture is active: reported, the capture invalidated.
static bool illegal_in_capture(const char* call) {
  CUstream_st* c = capturing_stream();
  if (!c) return false;
  report(true, std::string(call) + " while stream " + std::to_string(c->id) +
                   " is capturing a graph (illegal or capture-breaking on a GPU)");
  c->invalidated = true;
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Memory: device allocations are filled with 0xff (NaN) and framed by guard zones of 0xA5.
struct Alloc {
  size_t n;
  unsigned char* raw;
};
#ifdef __SANITIZE_ADDRESS__
static constexpr size_t kGuard = 0;  // AddressSanitizer's redzones do the bounds checks
#else
static constexpr size_t kGuard = 256;
#endif
static std::map<uintptr_t, Alloc> dev_allocs;  // user pointer -> allocation
static std::map<uintptr_t, size_t> pinned_allocs;
static size_t dev_bytes = 0;
// The emulated device's memory: EMU_DEVICE_MIB (default 8 GiB, host memory backs it), so that an
// allocation beyond it fails as cudaErrorMemoryAllocation instead of exhausting the host.
static size_t device_capacity() {
  static const size_t cap = [] {
    const char* e = std::getenv("EMU_DEVICE_MIB");
    const long long mib = e ? std::atoll(e) : 8192;
    return size_t(mib > 0 ? mib : 8192) << 20;
  }();
  return cap;
}

enum class Mem { Device, Pinned, Pageable, Bad };

static Mem classify(const void* ptr, size_t n) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  auto d = dev_allocs.upper_bound(p);
  if (d != dev_allocs.begin()) {
    --d;
    const uintptr_t b = d->first;
    const size_t sz = d->second.n;
    if (p >= b && p < b + sz) return p + n <= b + sz ? Mem::Device : Mem::Bad;
    if (p >= b - kGuard && p < b + sz + kGuard) return Mem::Bad;
  }
  auto h = pinned_allocs.upper_bound(p);
  if (h != pinned_allocs.begin()) {
    --h;
    if (p >= h->first && p + n <= h->first + h->second) return Mem::Pinned;
  }
  return Mem::Pageable;
}
static const char* mem_name(Mem m) {
  return m == Mem::Device ? "device" : m == Mem::Pinned ? "pinned host" : "pageable host";
}
static void check_guards(const std::string& after) {
  for (auto& kv : dev_allocs) {
    const Alloc& a = kv.second;
    for (size_t i = 0; i < kGuard; ++i)
      if (a.raw[i] != 0xA5 || a.raw[kGuard + a.n + i] != 0xA5) {
        report(true, "out-of-bounds write next to a device allocation of " + std::to_string(a.n) +
                         " bytes (guard byte " + std::to_string(i) +
                         (a.raw[i] != 0xA5 ? " before" : " after") + ") detected after " + after);
        std::memset(a.raw, 0xA5, kGuard);
        std::memset(a.raw + kGuard + a.n, 0xA5, kGuard);
        break;
      }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Stream queues: one queue of pending jobs in issue order; a wait runs the jobs it waits for.
struct Pending {
  CUstream_st* s;
  std::string what;
  Job job;
};
static std::deque<Pending> queue;
static void run_job(Pending& p) {
  p.job();
  ++jobs_run;
  check_guards(p.what);
}
// Runs the pending work a wait on `s` waits for (the legacy stream and blocking streams wait for each other).
static void flush(CUstream_st* s) {
  for (size_t i = 0; i < queue.size();) {
    CUstream_st* q = queue[i].s;
    const bool ordered = q == s || (s->legacy && (q->flags & cudaStreamNonBlocking) == 0) ||
                         (q->legacy && (s->flags & cudaStreamNonBlocking) == 0);
    if (!ordered) {
      ++i;
      continue;
    }
    for (size_t j = 0; j < i; ++j) {  // earlier legacy-stream work left pending: unordered on a GPU
      if (!queue[j].s->legacy && !q->legacy) continue;
      static std::set<std::string> said;
      if (said.insert(queue[j].what + std::to_string(q->id)).second)
        report(false, "stream " + std::to_string(q->id) + " runs " + queue[i].what + " while earlier " +
                          queue[j].what + " on stream " + std::to_string(queue[j].s->id) +
                          " is still pending (no ordering between them on a GPU)");
    }
    Pending p = std::move(queue[i]);
    queue.erase(queue.begin() + static_cast<long>(i));
    run_job(p);
  }
}
static void flush_all() {
  while (!queue.empty()) {
    Pending p = std::move(queue.front());
    queue.pop_front();
    run_job(p);
  }
}
static void warn_unordered(CUstream_st* s, const char* call) {
  for (auto& p : queue)
    if (p.s != s && (p.s->flags & cudaStreamNonBlocking)) {
      report(false, std::string(call) + " on the legacy stream while non-blocking stream " +
                        std::to_string(p.s->id) + " has pending work (" + p.what +
                        ", ...): not ordered with it on a GPU");
      return;
    }
}
void enqueue(cudaStream_t st, const char* what, Job job) {
  EmuLock lock_;
  CUstream_st* s = S(st);
  if (s->capturing) {
    s->graph.emplace_back(what, std::move(job));
    ++captured_jobs;
    return;
  }
  if (CUstream_st* c = capturing_stream())
    report(true, std::string(what) + " issued on stream " + std::to_string(s->id) + " while stream " +
                     std::to_string(c->id) + " captures (it runs now, outside the graph)");
  queue.push_back({s, what, std::move(job)});
}

// A block's most dynamic shared memory: EMU_SMEM_OPTIN_KB (default 227, an H100's; 99 is an Ada GPU's, which
// runs the sm_80 code), so that size-dependent kernel choices can be checked against a smaller device.
static size_t smem_optin() {
  static const size_t kb = [] {
    const char* e = std::getenv("EMU_SMEM_OPTIN_KB");
    const long v = e ? std::atol(e) : 0;
    return size_t(v > 0 ? v : 227);
  }();
  return kb * 1024;
}
static std::map<const void*, int> func_smem;
void set_func_smem(const void* k, int bytes) {
  EmuLock lock_;
  if (bytes < 0 || size_t(bytes) > smem_optin())
    report(true, "cudaFuncSetAttribute: " + std::to_string(bytes) +
                     " bytes of dynamic shared memory, more than the device's " +
                     std::to_string(smem_optin()));
  func_smem[k] = bytes;
}
void check_func_smem(const void* k, size_t dyn, const char* name) {
  EmuLock lock_;
  auto it = func_smem.find(k);
  const size_t lim = it == func_smem.end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (dyn > lim)
    fatal(std::string(name) + ": launch with " + std::to_string(dyn) +
          " bytes of dynamic shared memory above the kernel's limit " + std::to_string(lim));
}

// ---------------------------------------------------------------------------------------------------------
// Fibers (x86-64 System V: the callee-saved registers are pushed on the old stack, then the stacks swap).
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");

enum { kRun, kBar, kWarp, kDone, kMbar };
struct Fiber {
  void* sp;
  void* fake;  // AddressSanitizer's saved fake stack
  int state;
  const char* tag;  // the warp collective it waits in, and its pointer/ldm (WMMA)
  const void* p;
  unsigned ldm;
  uint64_t* bar = nullptr;  // kMbar: the mbarrier it waits on, and the parity of the phase it waits for
  unsigned parity = 0;
};
static constexpr size_t kStack = 256 * 1024, kPage = 4096;
static unsigned char* stack_mem = nullptr;
static unsigned stack_count = 0;
static std::vector<Fiber> fibers;
static void* sched_sp = nullptr;
static const std::function<void()>* body = nullptr;
static unsigned nthreads = 0;
static const char* kname = "";
static std::vector<unsigned char> dsmem_raw;
static unsigned char* dsmem = nullptr;
static uint64_t epoch = 0;  // one per block run
static std::map<void*, uint64_t> shared_epoch;
uint64_t slots[1024];
unsigned cur_thread = 0;

static const void* sched_bottom = nullptr;
static size_t sched_size = 0;
static void* sched_fake = nullptr;
// A thread's asynchronous operations of one kind (cp.async copies, wgmma MMAs): those not yet committed and
// the committed groups, oldest first. retire(keep, run) runs every group but the `keep` newest, oldest first.
template <class T>
struct GroupQueue {
  std::vector<T> open;
  std::deque<std::vector<T>> groups;
  void commit() {
    groups.push_back(std::move(open));
    open.clear();
  }
  template <class F>
  void retire(size_t keep, F run) {
    while (groups.size() > keep) {
      for (const T& op : groups.front()) run(op);
      groups.pop_front();
    }
  }
  void clear() {
    open.clear();
    groups.clear();
  }
};
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  size_t size, zfill;
};
using AsyncQueue = GroupQueue<AsyncCopy>;
static std::vector<AsyncQueue> async_q;
// wgmma.mma_async: each thread's issued MMAs, as groups (the open one last), run when a wait retires them.
struct Wgmma {
  float* d;
  int n;
  uint64_t da, db;
  bool scale_d, tnsp_b;
  uint64_t copies;  // cp.async copies issued in the block before this MMA
};
// Per 16-byte chunk of dynamic shared memory, the number of the last cp.async issued into it: an MMA that
// reads a chunk a later copy targets ran while that stage was being refilled (on a GPU it may read either).
static std::vector<uint64_t> chunk_copy;
static uint64_t copies_issued = 0;
// A cp.async or TMA copy issued into [d, d + bytes) of dynamic shared memory.
static void note_copy(const unsigned char* d, size_t bytes) {
  ++copies_issued;
  for (size_t o = 0; o < bytes; o += 16) chunk_copy[static_cast<size_t>(d - dsmem + o) / 16] = copies_issued;
}
using WgmmaQueue = GroupQueue<Wgmma>;
static std::vector<WgmmaQueue> wgmma_q;
static size_t dsmem_size = 0;
static void fiber_entry() {
  ASAN_FINISH(nullptr, &sched_bottom, &sched_size);
  (*body)();
  {
    const AsyncQueue& q = async_q[cur_thread];
    bool queued = !q.open.empty();
    for (const auto& g : q.groups) queued |= !g.empty();
    if (queued)
      report(true, std::string(kname) + ": thread " + std::to_string(cur_thread) +
                       " exited with a cp.async copy still queued (no __pipeline_wait_prior covered it)");
    const WgmmaQueue& w = wgmma_q[cur_thread];
    if (!w.open.empty() || !w.groups.empty())
      report(true, std::string(kname) + ": thread " + std::to_string(cur_thread) +
                       " exited with a wgmma not retired by wgmma.wait_group (or not committed)");
  }
  fibers[cur_thread].state = kDone;
  ASAN_START(nullptr, sched_bottom, sched_size);
  emu_switch(&fibers[cur_thread].sp, sched_sp);
  __builtin_trap();
}
static void ensure_stacks(unsigned n) {
  if (n <= stack_count) return;
  if (stack_mem) munmap(stack_mem, stack_count * (kStack + kPage));
  void* m = mmap(nullptr, n * (kStack + kPage), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) fatal("mmap of fiber stacks failed");
  stack_mem = static_cast<unsigned char*>(m);
  for (unsigned i = 0; i < n; ++i)
    mprotect(stack_mem + i * (kStack + kPage), kPage, PROT_NONE);  // guard page
  stack_count = n;
}
static void init_fiber(unsigned t) {
  void** sp = reinterpret_cast<void**>(stack_mem + t * (kStack + kPage) + kPage + kStack);
  *--sp = nullptr;                                // fake return address of fiber_entry
  *--sp = reinterpret_cast<void*>(&fiber_entry);  // emu_switch's return target
  for (int i = 0; i < 6; ++i) *--sp = nullptr;    // rbp rbx r12 r13 r14 r15
  fibers[t] = Fiber{sp, nullptr, kRun, nullptr, nullptr, 0, nullptr, 0};
  async_q[t].clear();
  wgmma_q[t].clear();
}
void async_copy(void* dst, const void* src, size_t size, size_t zfill) {
  if (size != 4 && size != 8 && size != 16)
    fatal(std::string(kname) + ": __pipeline_memcpy_async of " + std::to_string(size) +
          " bytes (4, 8 or 16)");
  if (zfill > size) fatal(std::string(kname) + ": __pipeline_memcpy_async zero fill larger than the copy");
  if (reinterpret_cast<uintptr_t>(dst) % size || reinterpret_cast<uintptr_t>(src) % size)
    fatal(std::string(kname) + ": __pipeline_memcpy_async with a pointer not aligned to " +
          std::to_string(size) + " bytes");
  async_q[cur_thread].open.push_back(
      {static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), size, zfill});
  const auto* d = static_cast<const unsigned char*>(dst);
  if (d >= dsmem && d < dsmem + dsmem_size) note_copy(d, size);
}
void async_commit() {
  async_q[cur_thread].commit();
}
// Lands every group but the `prior` newest (the latest moment the hardware may complete them).
void async_wait_prior(size_t prior) {
  async_q[cur_thread].retire(prior, [](const AsyncCopy& c) {
    std::memcpy(c.dst, c.src, c.size - c.zfill);
    std::memset(c.dst + (c.size - c.zfill), 0, c.zfill);
  });
}
// Shared-memory "addresses" (mma.cuh's smem_addr, the descriptors' start addresses): offsets into the
// block's dynamic shared memory plus kSmemWindow, which is not a multiple of 1024, so a kernel that assumes
// its dynamic shared memory starts 1024-byte aligned computes wrong addresses here.
static constexpr uint32_t kSmemWindow = 0x180;
uint32_t smem_addr(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < dsmem || b > dsmem + dsmem_size)
    fatal(std::string(kname) + ": smem_addr of a pointer outside the dynamic shared memory");
  return kSmemWindow + static_cast<uint32_t>(b - dsmem);
}
// The 128-byte swizzle (mma.cuh): the 16-byte chunk of a shared address moves by its 128-byte row's index
// within its 1024-byte atom. wgmma reads and TMA writes through it alike.
static uint32_t swizzle128(uint32_t logical) {
  return logical ^ (((logical >> 7) & 7u) << 4);
}
// Element (row, k) of a 128-byte-swizzled bf16 operand (mma.cuh, "wgmma"): rows are M for A, N for B.
static float wgmma_operand(uint64_t desc, bool mn_major, unsigned row, unsigned k, uint64_t copies) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fffu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fffu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fffu) << 4;
  if ((desc >> 62) != 1 || ((desc >> 49) & 7u) != 0)
    fatal(std::string(kname) +
          ": wgmma descriptor: only the 128-byte swizzle with base offset 0 is emulated");
  const uint32_t logical = mn_major ? start + row / 64 * lbo + row % 64 * 2 + k % 8 * 128 + k / 8 * sbo
                                    : start + row / 8 * sbo + row % 8 * 128 + k * 2;
  const uint32_t addr = swizzle128(logical);
  if (addr < kSmemWindow || addr + 2 > kSmemWindow + dsmem_size)
    fatal(std::string(kname) + ": wgmma operand read outside the dynamic shared memory");
  if (chunk_copy[(addr - kSmemWindow) / 16] > copies)
    fatal(std::string(kname) +
          ": a cp.async or TMA copy into shared memory an in-flight wgmma reads (wait for the MMA "
          "group before refilling its stage)");
  uint16_t bits;
  std::memcpy(&bits, dsmem + (addr - kSmemWindow), 2);
  return __bfloat162float(__nv_bfloat16{bits});
}
static void wgmma_run(const Wgmma& m) {
  const unsigned t = cur_thread % 128, w = t / 32, l = t % 32;
  for (int i = 0; i < m.n / 2; ++i) {
    const unsigned j = static_cast<unsigned>(i) / 4, e = static_cast<unsigned>(i) % 4;
    const unsigned row = 16 * w + l / 4 + 8 * (e / 2), col = 8 * j + 2 * (l % 4) + e % 2;
    double s = m.scale_d ? m.d[i] : 0.0;
    for (unsigned k = 0; k < 16; ++k)
      s += static_cast<double>(wgmma_operand(m.da, false, row, k, m.copies)) *
           wgmma_operand(m.db, m.tnsp_b, col, k, m.copies);
    m.d[i] = static_cast<float>(s);
  }
}
void wgmma_fence() {
  warp_barrier("wgmma.fence");
}
void wgmma_bf16(float* d, int n, uint64_t da, uint64_t db, bool scale_d, bool tnsp_b) {
  if (nthreads % 128 != 0) fatal(std::string(kname) + ": wgmma in a block that is not whole warpgroups");
  uint64_t a[32], b[32];
  warp_gather("wgmma.mma_async", da, a);
  warp_gather("wgmma.mma_async", db, b);
  for (unsigned l = 0; l < 32; ++l)
    if (a[l] != da || b[l] != db) fatal(std::string(kname) + ": wgmma descriptors differ across the warp");
  wgmma_q[cur_thread].open.push_back({d, n, da, db, scale_d, tnsp_b, copies_issued});
}
void wgmma_commit() {
  warp_barrier("wgmma.commit_group");
  wgmma_q[cur_thread].commit();
}
void wgmma_wait(int pending) {
  warp_barrier("wgmma.wait_group");
  wgmma_q[cur_thread].retire(static_cast<size_t>(pending), wgmma_run);
}
// ---- mbarrier and TMA ----
static void yield_to_sched(unsigned me);
// A TMA tile load waiting on its barrier: the box's rows of the tensor map's global memory, zero past the
// tensor, into the swizzled destination.
struct TmaLoad {
  unsigned char* dst;
  const CUtensorMap* map;
  int c0, c1;
};
struct Mbar {
  unsigned count = 0, pending = 0;  // arrivals a phase needs, and those still missing
  int64_t tx = 0;                   // transaction bytes expected and not yet landed
  unsigned phase = 0;               // completed phases
  std::vector<TmaLoad> loads;       // issued, not landed
};
static std::map<const uint64_t*, Mbar> mbars;  // this block's, by address
// Emulated tensor map fields (cuTensorMapEncodeTiled below): opaque[0..6].
enum { kMapAddr, kMapDim0, kMapDim1, kMapStride, kMapBox0, kMapBox1, kMapMagic };
static constexpr uint64_t kMapTag = 0x7450414d4d54ull;
// The bytes a load of the map's box writes (and completes on its barrier, zero-filled ones included).
static uint64_t box_bytes(const uint64_t* f) {
  return f[kMapBox0] * f[kMapBox1] * 2;
}
static Mbar& mbar_at(const uint64_t* bar, const char* what, bool init = false) {
  const auto* b = reinterpret_cast<const unsigned char*>(bar);
  if (b < dsmem || b + 8 > dsmem + dsmem_size || reinterpret_cast<uintptr_t>(bar) % 8)
    fatal(std::string(kname) + ": " + what +
          " on an mbarrier outside dynamic shared memory or not 8-aligned");
  if (init) return mbars[bar];
  const auto it = mbars.find(bar);
  if (it == mbars.end()) fatal(std::string(kname) + ": " + what + " on an mbarrier never initialised");
  return it->second;
}
static void mbar_complete(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.count;
  }
}
// Lands the barrier's queued TMA loads (the latest moment they may complete: someone now waits on it).
static void mbar_land(Mbar& m) {
  for (const TmaLoad& l : m.loads) {
    const uint64_t* f = l.map->opaque;
    const auto* g = reinterpret_cast<const unsigned char*>(f[kMapAddr]);
    const uint64_t box0 = f[kMapBox0], box1 = f[kMapBox1];
    const uint32_t base = kSmemWindow + static_cast<uint32_t>(l.dst - dsmem);
    for (uint64_t r = 0; r < box1; ++r)
      for (uint64_t c = 0; c < box0; ++c) {
        const int64_t gc = l.c0 + static_cast<int64_t>(c), gr = l.c1 + static_cast<int64_t>(r);
        uint16_t v = 0;
        if (gc >= 0 && gr >= 0 && static_cast<uint64_t>(gc) < f[kMapDim0] &&
            static_cast<uint64_t>(gr) < f[kMapDim1])
          std::memcpy(&v, g + static_cast<uint64_t>(gr) * f[kMapStride] + static_cast<uint64_t>(gc) * 2, 2);
        const uint32_t addr = swizzle128(base + static_cast<uint32_t>(r * box0 * 2 + c * 2));
        std::memcpy(dsmem + (addr - kSmemWindow), &v, 2);
      }
    m.tx -= static_cast<int64_t>(box_bytes(f));
  }
  m.loads.clear();
  mbar_complete(m);
}
void mbar_init(uint64_t* bar, unsigned count) {
  if (count < 1) fatal(std::string(kname) + ": mbarrier.init with a count of 0");
  Mbar& m = mbar_at(bar, "mbarrier.init", true);
  if (!m.loads.empty()) fatal(std::string(kname) + ": mbarrier.init on a barrier with TMA loads in flight");
  m = Mbar{count, count, 0, 0, {}};
}
void mbar_arrive(uint64_t* bar, uint32_t expect_tx) {
  Mbar& m = mbar_at(bar, "mbarrier.arrive");
  if (m.pending == 0) fatal(std::string(kname) + ": mbarrier.arrive past the phase's count");
  m.tx += expect_tx;
  --m.pending;
  mbar_complete(m);
}
static bool mbar_done(uint64_t* bar, unsigned parity) {
  Mbar& m = mbar_at(bar, "mbarrier.try_wait");
  mbar_land(m);
  return (m.phase & 1u) != (parity & 1u);  // the phase of that parity is the last completed one
}
void mbar_wait(uint64_t* bar, unsigned parity) {
  while (!mbar_done(bar, parity)) {
    Fiber& f = fibers[cur_thread];
    f.state = kMbar;
    f.bar = bar;
    f.parity = parity;
    yield_to_sched(cur_thread);
  }
}
void tma_load_2d(void* dst, const void* map, uint64_t* bar, int c0, int c1) {
  const auto* tm = static_cast<const CUtensorMap*>(map);
  const uint64_t* f = tm->opaque;
  if (f[kMapMagic] != kMapTag)
    fatal(std::string(kname) + ": TMA load with a tensor map not from cuTensorMapEncodeTiled");
  auto* d = static_cast<unsigned char*>(dst);
  const uint64_t bytes = box_bytes(f);
  if (d < dsmem || d + bytes > dsmem + dsmem_size)
    fatal(std::string(kname) + ": TMA load outside the dynamic shared memory");
  if ((kSmemWindow + static_cast<uint32_t>(d - dsmem)) % 128)
    fatal(std::string(kname) + ": TMA load into shared memory not 128-byte aligned (the 128-byte swizzle)");
  Mbar& m = mbar_at(bar, "cp.async.bulk.tensor");
  m.loads.push_back({d, tm, c0, c1});
  note_copy(d, bytes);
}

static void resume(unsigned t) {
  cur_thread = t;
  threadIdx = uint3{t, 0, 0};
  ASAN_START(&sched_fake, stack_mem + t * (kStack + kPage) + kPage, kStack);
  emu_switch(&sched_sp, fibers[t].sp);
  ASAN_FINISH(sched_fake, nullptr, nullptr);
}
static void yield_to_sched(unsigned me) {
  ASAN_START(&fibers[me].fake, sched_bottom, sched_size);
  emu_switch(&fibers[me].sp, sched_sp);
  ASAN_FINISH(fibers[me].fake, &sched_bottom, &sched_size);
}
void block_barrier() {
  fibers[cur_thread].state = kBar;
  yield_to_sched(cur_thread);
}
// The last lane to arrive releases the warp (after checking that all lanes are in the same collective
// with the same pointer and ldm); the others wait.
void warp_barrier(const char* what, const void* p, unsigned ldm) {
  const unsigned me = cur_thread, w0 = me & ~31u;
  if (w0 + 32 > nthreads)
    fatal(std::string(kname) + ": " + what + " in a partial warp (blockDim.x = " + std::to_string(nthreads) +
          ")");
  Fiber& f = fibers[me];
  f.state = kWarp;
  f.tag = what;
  f.p = p;
  f.ldm = ldm;
  for (unsigned l = 0; l < 32; ++l) {
    const Fiber& o = fibers[w0 + l];
    if (o.state == kDone) fatal(std::string(kname) + ": " + what + " with an exited lane in the warp");
    if (o.state != kWarp) {
      yield_to_sched(me);
      return;
    }
  }
  for (unsigned l = 0; l < 32; ++l) {
    Fiber& o = fibers[w0 + l];
    if (std::strcmp(o.tag, f.tag) != 0 || o.p != f.p || o.ldm != f.ldm)
      fatal(std::string(kname) + ": warp collective mismatch (" + o.tag + " vs " + f.tag +
            ", or different pointer/ldm across lanes)");
    o.state = kRun;
  }
}
void* dyn_smem_ptr() {
  return dsmem;
}
void poison_shared(void* p, size_t n) {
  uint64_t& e = shared_epoch[p];
  if (e != epoch) {
    std::memset(p, 0xff, n);
    e = epoch;
  }
}

// Runs the fibers phase by phase: a phase runs every runnable fiber until it blocks; when none can run, a
// complete __syncthreads releases them all. The order within a phase rotates (forward, reverse, warp by
// warp forward, warp by warp backward).
static void run_block(unsigned block_linear) {
  for (unsigned t = 0; t < nthreads; ++t) init_fiber(t);
  const unsigned nw = (nthreads + 31) / 32;
  for (unsigned phase = 0;; ++phase) {
    const unsigned kind = (phase + order_seed + block_linear) % 4;
    for (bool ran = true; ran;) {
      ran = false;
      auto run = [&](unsigned t) {
        if (t >= nthreads) return false;
        Fiber& f = fibers[t];
        if (f.state == kMbar && mbar_done(f.bar, f.parity)) f.state = kRun;
        if (f.state != kRun) return false;
        resume(t);
        return true;
      };
      if (kind < 2) {
        for (unsigned i = 0; i < nthreads; ++i) ran |= run(kind == 0 ? i : nthreads - 1 - i);
      } else {
        for (unsigned wi = 0; wi < nw; ++wi) {
          const unsigned w = kind == 2 ? wi : nw - 1 - wi;
          for (bool any = true; any;) {
            any = false;
            for (unsigned l = 0; l < 32; ++l) any |= run(w * 32 + (kind == 2 ? l : 31 - l));
            ran |= any;
          }
        }
      }
    }
    unsigned at = 0, done = 0, warp = 0, spin = 0;
    for (unsigned t = 0; t < nthreads; ++t)
      (fibers[t].state == kBar    ? at
       : fibers[t].state == kDone ? done
       : fibers[t].state == kMbar ? spin
                                  : warp) += 1;
    if (done == nthreads) {
      for (const auto& [bar, m] : mbars)
        if (!m.loads.empty())
          report(true, std::string(kname) + ": block exited with a TMA load no thread waited for");
      return;
    }
    if (warp) fatal(std::string(kname) + ": incomplete warp collective (deadlock)");
    if (spin)
      fatal(std::string(kname) + ": " + std::to_string(spin) +
            " threads wait on mbarrier phases no arrival or TMA load can complete (deadlock)");
    if (done)
      fatal(std::string(kname) + ": divergent __syncthreads (" + std::to_string(at) + " at the barrier, " +
            std::to_string(done) + " exited)");
    for (unsigned t = 0; t < nthreads; ++t) fibers[t].state = kRun;
  }
}

void run_grid(dim3 grid, dim3 block, size_t dyn, const char* name, const std::function<void()>& b) {
  if (block.x < 1 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x < 1 || grid.y < 1 ||
      grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    fatal(std::string(name) + ": invalid (or, for blockDim.y/z, unemulated) launch configuration grid (" +
          std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block (" +
          std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  ensure_stacks(block.x);
  fibers.resize(std::max<size_t>(fibers.size(), block.x));
  async_q.resize(std::max<size_t>(async_q.size(), block.x));
  wgmma_q.resize(std::max<size_t>(wgmma_q.size(), block.x));
  nthreads = block.x;
  body = &b;
  kname = name;
  gridDim = grid;
  blockDim = block;
  if (dsmem_raw.size() < dyn + 256) dsmem_raw.resize(dyn + 256);
  dsmem_size = dyn;
  chunk_copy.assign(dyn / 16 + 1, 0);
  dsmem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dsmem_raw.data()) + 127) &
                                           ~uintptr_t{127});
  const uint64_t nb = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t i = 0; i < nb; ++i) {
    const uint64_t k = reverse_blocks ? nb - 1 - i : i;
    blockIdx = uint3{static_cast<unsigned>(k % grid.x), static_cast<unsigned>(k / grid.x % grid.y),
                     static_cast<unsigned>(k / grid.x / grid.y)};
    ++epoch;
    mbars.clear();
    if (dyn) std::memset(dsmem, 0xff, dyn);
    run_block(static_cast<unsigned>(k));
  }
  body = nullptr;
}
}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// Runtime API
using namespace emu;

cudaError_t cudaSetDevice(int d) {
  EmuLock lock_;
  return d == 0 ? cudaSuccess : fail(cudaErrorInvalidValue);
}
cudaError_t cudaGetDevice(int* d) {
  EmuLock lock_;
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* c) {
  EmuLock lock_;
  *c = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  EmuLock lock_;
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "CPU emulator");
  p->major = 9;
  p->minor = 0;
  p->totalGlobalMem = device_capacity();
  // 132 (an H100 SXM) unless EMU_SMS says otherwise: fewer SMs make persistent grids walk several tiles.
  static const int sms = [] {
    const char* e = std::getenv("EMU_SMS");
    const int v = e ? std::atoi(e) : 0;
    return v > 0 ? v : 132;
  }();
  p->multiProcessorCount = sms;
  p->sharedMemPerBlock = 48 * 1024;
  p->sharedMemPerBlockOptin = smem_optin();
  p->sharedMemPerMultiprocessor = 228 * 1024;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  EmuLock lock_;
  if (illegal_in_capture("cudaDeviceSynchronize")) return fail(cudaErrorStreamCaptureUnsupported);
  flush_all();
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  EmuLock lock_;
  const int e = last_error;
  last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
      return "cudaErrorStreamCaptureInvalidated";
    default:
      return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  return cudaGetErrorName(e);
}

cudaError_t cudaMalloc(void** p, size_t n) {
  EmuLock lock_;
  illegal_in_capture("cudaMalloc");  // reported; the allocation still happens
  // EMU_MAX_ALLOC_BYTES (read at each call, so a check can set it between calls): a larger single
  // allocation fails, as on a nearly full device.
  if (const char* m = std::getenv("EMU_MAX_ALLOC_BYTES"); m && *m && n > std::strtoull(m, nullptr, 10))
    return fail(cudaErrorMemoryAllocation);
  if (n > device_capacity() - std::min(dev_bytes, device_capacity())) return fail(cudaErrorMemoryAllocation);
  unsigned char* raw = nullptr;
  if (posix_memalign(reinterpret_cast<void**>(&raw), 256, n + 2 * kGuard))
    return fail(cudaErrorMemoryAllocation);
  std::memset(raw, 0xA5, kGuard);
  std::memset(raw + kGuard, 0xff, n);
  std::memset(raw + kGuard + n, 0xA5, kGuard);
  *p = raw + kGuard;
  dev_allocs[reinterpret_cast<uintptr_t>(*p)] = Alloc{n, raw};
  dev_bytes += n;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  EmuLock lock_;
  if (!p) return cudaSuccess;
  if (illegal_in_capture("cudaFree")) return fail(cudaErrorStreamCaptureUnsupported);
  flush_all();  // cudaFree synchronises the device
  auto it = dev_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == dev_allocs.end()) {
    report(true, "cudaFree of a pointer that is not a live device allocation");
    return fail(cudaErrorInvalidValue);
  }
  check_guards("cudaFree");
  dev_bytes -= it->second.n;
  std::memset(it->second.raw, 0xEE, it->second.n + 2 * kGuard);
  std::free(it->second.raw);
  dev_allocs.erase(it);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t n) {
  EmuLock lock_;
  if (illegal_in_capture("cudaMallocHost")) return fail(cudaErrorStreamCaptureUnsupported);
  if (posix_memalign(p, 4096, n ? n : 1)) return fail(cudaErrorMemoryAllocation);
  std::memset(*p, 0xcd, n);
  pinned_allocs[reinterpret_cast<uintptr_t>(*p)] = n;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  EmuLock lock_;
  if (!p) return cudaSuccess;
  if (illegal_in_capture("cudaFreeHost")) return fail(cudaErrorStreamCaptureUnsupported);
  flush_all();
  auto it = pinned_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == pinned_allocs.end()) {
    report(true, "cudaFreeHost of an unknown pointer");
    return fail(cudaErrorInvalidValue);
  }
  std::memset(p, 0xEE, it->second);
  std::free(p);
  pinned_allocs.erase(it);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* f, size_t* t) {
  EmuLock lock_;
  *t = device_capacity();
  *f = *t - std::min(dev_bytes, *t);
  return cudaSuccess;
}

// Checks one side of a copy against the copy kind; returns its memory class.
static Mem side(const void* p, size_t n, bool want_device, const char* call, const char* which) {
  const Mem m = classify(p, n);
  if (m == Mem::Bad)
    fatal(std::string(call) + ": " + which + " range of " + std::to_string(n) +
          " bytes runs past its device allocation");
  if (want_device != (m == Mem::Device))
    fatal(std::string(call) + ": " + which + " is " + mem_name(m) + " memory, but the copy kind says " +
          (want_device ? "device" : "host"));
  return m;
}
static void kind_sides(cudaMemcpyKind k, bool* dst_dev, bool* src_dev) {
  if (k == cudaMemcpyDefault || k == cudaMemcpyHostToHost)
    fatal("cudaMemcpy kinds Default and HostToHost are not emulated");
  *dst_dev = k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice;
  *src_dev = k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice;
}

// Synchronous cudaMemcpy on the legacy stream, with the documented host synchronisation: pageable host to
// device returns once the data is staged (the DMA may still be pending), device to device does not block,
// copies to the host block until done. A legacy-stream copy is not ordered with non-blocking streams.
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) {
  EmuLock lock_;
  if (illegal_in_capture("cudaMemcpy (synchronous)")) return fail(cudaErrorStreamCaptureUnsupported);
  bool dd, sd;
  kind_sides(k, &dd, &sd);
  if (!n) return cudaSuccess;
  side(d, n, dd, "cudaMemcpy", "destination");
  const Mem ms = side(s, n, sd, "cudaMemcpy", "source");
  warn_unordered(S(nullptr), "cudaMemcpy");
  if (dd && sd) {
    enqueue(nullptr, "cudaMemcpy D2D", [=] { std::memmove(d, s, n); });
    return cudaSuccess;
  }
  flush(S(nullptr));
  if (dd && ms == Mem::Pageable) {
    auto staged =
        std::make_shared<std::vector<char>>(static_cast<const char*>(s), static_cast<const char*>(s) + n);
    enqueue(nullptr, "cudaMemcpy H2D (pageable: DMA pending)", [=] { std::memcpy(d, staged->data(), n); });
    return cudaSuccess;
  }
  std::memmove(d, s, n);
  check_guards("cudaMemcpy");
  return cudaSuccess;
}

static cudaError_t copy_async(const char* call, void* d, size_t dpitch, const void* s, size_t spitch,
                              size_t w, size_t h, cudaMemcpyKind k, cudaStream_t st) {
  bool dd, sd;
  kind_sides(k, &dd, &sd);
  if (w > dpitch || w > spitch) {
    report(true, std::string(call) + ": width above a pitch");
    return fail(cudaErrorInvalidValue);
  }
  const size_t dspan = h ? (h - 1) * dpitch + w : 0, sspan = h ? (h - 1) * spitch + w : 0;
  if (dspan == 0) return cudaSuccess;
  const Mem md = side(d, dspan, dd, call, "destination"), ms = side(s, sspan, sd, call, "source");
  CUstream_st* stp = S(st);
  auto copy_rows = [=](const char* from) {
    for (size_t r = 0; r < h; ++r) std::memmove(static_cast<char*>(d) + r * dpitch, from + r * spitch, w);
  };
  if (md == Mem::Pageable || ms == Mem::Pageable) {
    if (stp->capturing) {
      report(true, std::string(call) + " with pageable host memory inside a graph capture");
      stp->invalidated = true;
      return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (ms == Mem::Pageable) {  // staged at the call; the device write is stream-ordered
      auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(s),
                                                        static_cast<const char*>(s) + sspan);
      enqueue(st, call, [=] { copy_rows(staged->data()); });
    } else {  // to pageable memory: returns when done
      flush(stp);
      copy_rows(static_cast<const char*>(s));
    }
    return cudaSuccess;
  }
  enqueue(st, call, [=] { copy_rows(static_cast<const char*>(s)); });
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
  EmuLock lock_;
  return copy_async("cudaMemcpyAsync", d, n, s, n, n, 1, k, st);
}
cudaError_t cudaMemcpy2DAsync(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t h,
                              cudaMemcpyKind k, cudaStream_t st) {
  EmuLock lock_;
  return copy_async("cudaMemcpy2DAsync", d, dp, s, sp, w, h, k, st);
}
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t st) {
  EmuLock lock_;
  if (!n) return cudaSuccess;
  side(d, n, true, "cudaMemsetAsync", "destination");
  enqueue(st, "cudaMemsetAsync", [=] { std::memset(d, v, n); });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* d, int v, size_t n) {
  EmuLock lock_;
  if (illegal_in_capture("cudaMemset")) return fail(cudaErrorStreamCaptureUnsupported);
  if (!n) return cudaSuccess;
  side(d, n, true, "cudaMemset", "destination");
  enqueue(nullptr, "cudaMemset", [=] { std::memset(d, v, n); });
  return cudaSuccess;
}

static int next_stream_id = 1;
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  EmuLock lock_;
  return cudaStreamCreateWithFlags(s, cudaStreamDefault);
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  EmuLock lock_;
  *s = new CUstream_st;
  (*s)->flags = flags;
  (*s)->id = next_stream_id++;
  streams.insert(*s);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  EmuLock lock_;
  if (!s) return cudaSuccess;
  CUstream_st* p = S(s);
  if (p->capturing) report(true, "cudaStreamDestroy of a capturing stream");
  flush(p);
  streams.erase(p);
  delete p;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  EmuLock lock_;
  if (illegal_in_capture("cudaStreamSynchronize")) return fail(cudaErrorStreamCaptureUnsupported);
  CUstream_st* p = S(s);
  if (p->legacy) warn_unordered(p, "cudaStreamSynchronize(0)");
  flush(p);
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  EmuLock lock_;
  CUstream_st* p = S(s);
  if (p->legacy) {
    report(true, "capture on the legacy stream");
    return fail(cudaErrorInvalidValue);
  }
  if (capturing_stream()) {
    report(true, "nested capture");
    return fail(cudaErrorInvalidValue);
  }
  p->capturing = true;
  p->invalidated = false;
  p->graph.clear();
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  EmuLock lock_;
  CUstream_st* p = S(s);
  *g = nullptr;
  if (!p->capturing) {
    report(true, "cudaStreamEndCapture on a stream that is not capturing");
    return fail(cudaErrorInvalidValue);
  }
  p->capturing = false;
  Ops ops = std::move(p->graph);
  p->graph.clear();
  if (p->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
  *g = new CUgraph_st{std::move(ops)};
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
  EmuLock lock_;
  if (!g) return fail(cudaErrorInvalidValue);
  *e = new CUgraphExec_st{g->ops};
  live_execs.insert(*e);
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
  EmuLock lock_;
  if (!live_execs.count(e)) {
    report(true, "cudaGraphLaunch of a destroyed graph");
    return fail(cudaErrorInvalidValue);
  }
  CUstream_st* p = S(s);
  if (p->capturing) {
    report(true, "cudaGraphLaunch into a capturing stream");
    return fail(cudaErrorInvalidValue);
  }
  ++graph_launches;
  for (auto& op : e->ops) enqueue(s, op.first.c_str(), op.second);
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  EmuLock lock_;
  delete g;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  EmuLock lock_;
  if (!live_execs.count(e)) {
    report(true, "cudaGraphExecDestroy of an unknown graph");
    return fail(cudaErrorInvalidValue);
  }
  // Pending replays hold copies of the jobs, so destroying after the launch is fine (as on a GPU).
  live_execs.erase(e);
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  EmuLock lock_;
  *e = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  EmuLock lock_;
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  EmuLock lock_;
  e->s = s;
  enqueue(s, "cudaEventRecord", [e] {
    e->t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch())
               .count();
  });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  EmuLock lock_;
  if (illegal_in_capture("cudaEventSynchronize")) return fail(cudaErrorStreamCaptureUnsupported);
  flush(S(e->s));
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  EmuLock lock_;
  *ms = static_cast<float>(b->t - a->t);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------
// Driver: tensor maps for TMA loads (only what the emulated load reads: 2-D bf16, 128-byte swizzle).
CUresult cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* addr,
                                const cuuint64_t* dim, const cuuint64_t* strides, const cuuint32_t* box,
                                const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                                CUtensorMapSwizzle swizzle, CUtensorMapL2promotion,
                                CUtensorMapFloatOOBfill fill) {
  EmuLock lock_;
  auto bad = [](const std::string& why) {
    emu::report(true, "cuTensorMapEncodeTiled: " + why);
    return CUDA_ERROR_INVALID_VALUE;
  };
  if (!map || reinterpret_cast<uintptr_t>(map) % 64) return bad("map null or not 64-byte aligned");
  if (type != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 || rank != 2 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      swizzle != CU_TENSOR_MAP_SWIZZLE_128B || fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return bad("only 2-D bf16 maps with the 128-byte swizzle, no interleave, zero fill are emulated");
  if (reinterpret_cast<uintptr_t>(addr) % 16) return bad("global address not 16-byte aligned");
  if (dim[0] < 1 || dim[1] < 1 || dim[0] > (uint64_t{1} << 32) || dim[1] > (uint64_t{1} << 32))
    return bad("dimensions out of [1, 2^32]");
  if (strides[0] % 16 || strides[0] < dim[0] * 2)
    return bad("row stride not a multiple of 16 or below the row");
  if (box[0] < 1 || box[1] < 1 || box[0] > 256 || box[1] > 256 || box[0] * 2 > 128 || box[0] * 2 % 16)
    return bad("box out of range (inner box at most the 128-byte swizzle span, a multiple of 16 bytes)");
  if (elem_strides[0] != 1 || elem_strides[1] != 1) return bad("element strides other than 1");
  std::memset(map->opaque, 0, sizeof(map->opaque));
  map->opaque[emu::kMapAddr] = reinterpret_cast<uintptr_t>(addr);
  map->opaque[emu::kMapDim0] = dim[0];
  map->opaque[emu::kMapDim1] = dim[1];
  map->opaque[emu::kMapStride] = strides[0];
  map->opaque[emu::kMapBox0] = box[0];
  map->opaque[emu::kMapBox1] = box[1];
  map->opaque[emu::kMapMagic] = emu::kMapTag;
  return CUDA_SUCCESS;
}
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  EmuLock lock_;
  const bool found = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = found ? reinterpret_cast<void*>(&cuTensorMapEncodeTiled) : nullptr;
  if (status) *status = found ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
