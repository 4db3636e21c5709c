#include "guarded_copy.hpp"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "copy_blocks.hpp"
#include "stream_copy.hpp"
#include "thread_pool.hpp"

namespace kvbm {
namespace {

// One guarded copy on one thread: the mapping's range and where to jump back to.
struct Guard {
  sigjmp_buf jb;
  uintptr_t lo, hi;
};

// The threads inside a guarded copy, found by the handler without thread-local storage (a
// dlopen'ed module's TLS is allocated lazily by __tls_get_addr, which is not async-signal-safe,
// and initial-exec TLS would not fit the static TLS block beside torch's).
constexpr size_t kSlots = 256;
struct Slot {
  std::atomic<pid_t> tid{0};
  std::atomic<Guard*> guard{nullptr};
};
Slot g_slots[kSlots];

pid_t this_tid() { return static_cast<pid_t>(syscall(SYS_gettid)); }

Guard* find_guard(pid_t tid) {
  for (auto& s : g_slots)
    if (s.tid.load(std::memory_order_acquire) == tid) return s.guard.load(std::memory_order_acquire);
  return nullptr;
}

// Registers g for this thread until destroyed.
class Registered {
 public:
  Registered(Guard* g) {
    const pid_t tid = this_tid();
    for (;;) {
      for (auto& s : g_slots) {
        pid_t free = 0;
        // claim the slot first, then name the guard: only this thread reads it (its own faults,
        // which come after this store in its program order)
        if (s.tid.load(std::memory_order_relaxed) == 0 &&
            s.tid.compare_exchange_strong(free, tid, std::memory_order_acq_rel)) {
          s.guard.store(g, std::memory_order_release);
          slot_ = &s;
          return;
        }
      }
      std::this_thread::yield();  // 256 threads copying at once: wait for one to end
    }
  }
  ~Registered() {
    slot_->guard.store(nullptr, std::memory_order_release);
    slot_->tid.store(0, std::memory_order_release);
  }
  Registered(const Registered&) = delete;
  Registered& operator=(const Registered&) = delete;

 private:
  Slot* slot_ = nullptr;
};

std::mutex g_install_mu;
struct sigaction g_prev;                // the handler ours replaced: every fault not ours goes there
std::atomic<bool> g_chained{false};     // a fault not ours already went to g_prev

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  Guard* g = find_guard(this_tid());
  // si_code > 0: sent by the kernel for a fault (a raise() or kill() is <= 0, never ours)
  if (g != nullptr && info != nullptr && info->si_code > 0) {
    const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
    if (a >= g->lo && a < g->hi) siglongjmp(g->jb, 1);
  }
  // Not ours: give the signal back to whoever had it, and let it do what it would have done.
  if (g_chained.exchange(true)) {  // it came back to us (a handler that re-raises through ours)
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
    return;
  }
  struct sigaction prev = g_prev;
  sigaction(SIGBUS, &prev, nullptr);
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction != nullptr) prev.sa_sigaction(sig, info, ctx);
    return;
  }
  if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {  // ignoring a fault loops forever
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
    return;
  }
  prev.sa_handler(sig);
}

bool ours(const struct sigaction& sa) {
  return (sa.sa_flags & SA_SIGINFO) != 0 && sa.sa_sigaction == &on_sigbus;
}

// Our handler, installed (again) if someone replaced it since: chains to what it replaces.
void ensure_handler() {
  struct sigaction cur;
  if (sigaction(SIGBUS, nullptr, &cur) == 0 && ours(cur)) return;
  std::lock_guard<std::mutex> lk(g_install_mu);
  if (sigaction(SIGBUS, nullptr, &cur) == 0 && ours(cur)) return;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = &on_sigbus;
  // SA_NODEFER: SIGBUS is not blocked while the handler runs, so after the siglongjmp (which
  // restores no mask: sigsetjmp(jb, 0), no system call per block) the thread can fault again.
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  struct sigaction old;
  std::memset(&old, 0, sizeof old);
  if (sigaction(SIGBUS, nullptr, &old) != 0) throw std::runtime_error("sigaction(SIGBUS) failed");
  g_prev = old;
  g_chained = false;
  if (sigaction(SIGBUS, &sa, nullptr) != 0) throw std::runtime_error("sigaction(SIGBUS) failed");
}

// Blocks [first, last) on this thread, each under the guard.
void copy_range(bool to_map, uint8_t* map, size_t map_len, const int64_t* map_offsets, uint8_t* buf,
                const int64_t* buf_offsets, size_t first, size_t last, int64_t nbytes, bool stream,
                int32_t* status) {
  Guard g;
  g.lo = reinterpret_cast<uintptr_t>(map);
  g.hi = g.lo + map_len;
  const auto len = static_cast<size_t>(nbytes);
  volatile size_t i = first;  // survives the siglongjmp
  Registered reg(&g);
  for (;;) {
    if (sigsetjmp(g.jb, 0) == 0) {
      for (; i < last; i = i + 1) {
        const size_t k = i;
        uint8_t* m = map + map_offsets[k];
        uint8_t* b = buf + buf_offsets[k];
        if (to_map)
          copy_bytes(m, b, len, stream);
        else
          copy_bytes(b, m, len, stream);
        status[k] = 0;
      }
      break;
    }
    status[i] = EFAULT;  // the mapping faulted inside block i: the rest still move
    i = i + 1;
  }
}

}  // namespace

uint8_t* map_shared(int fd, size_t nbytes) {
  if (nbytes == 0) throw std::invalid_argument("map_shared: nbytes must be > 0");
  void* p = ::mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw std::runtime_error(std::string("mmap: ") + std::strerror(errno));
  return static_cast<uint8_t*>(p);
}

void unmap_shared(uint8_t* addr, size_t nbytes) {
  if (addr != nullptr) ::munmap(addr, nbytes);
}

void guarded_copy_blocks(bool to_map, uint8_t* map, size_t map_len, const int64_t* map_offsets,
                         uint8_t* buf, const int64_t* buf_offsets, size_t n, int64_t nbytes,
                         unsigned threads, int32_t* status) {
  if (n == 0) return;
  std::fill(status, status + n, EFAULT);
  if (nbytes == 0) {
    std::fill(status, status + n, 0);
    return;
  }
  ensure_handler();
  const bool stream = static_cast<uint64_t>(nbytes) * n >= kStreamAbove;
  const size_t tasks = std::min<size_t>(std::max(1u, threads), n);
  if (tasks <= 1) {
    copy_range(to_map, map, map_len, map_offsets, buf, buf_offsets, 0, n, nbytes, stream, status);
    return;
  }
  const size_t per = (n + tasks - 1) / tasks;
  parallel_for(tasks, [&](size_t t) {
    const size_t first = std::min(n, t * per), last = std::min(n, first + per);
    if (first < last)
      copy_range(to_map, map, map_len, map_offsets, buf, buf_offsets, first, last, nbytes, stream, status);
  });
}

bool sigbus_guard_installed() {
  struct sigaction cur;
  return sigaction(SIGBUS, nullptr, &cur) == 0 && ours(cur);
}

}  // namespace kvbm
