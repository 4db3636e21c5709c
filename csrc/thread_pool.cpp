#include "thread_pool.hpp"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvbm {
namespace {

constexpr unsigned kMaxThreads = 8;  // copies saturate memory bandwidth well before this
constexpr uint64_t kMinBytesPerTask = 256u << 10;

unsigned usable_cpus() {
  // The affinity mask, not hardware_concurrency(): containers and taskset limit it.
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

struct Batch {
  const std::function<void(size_t)>* fn;
  size_t n;
  std::atomic<size_t> next{0};
  size_t done = 0;  // guarded by Pool::mu
  std::condition_variable finished;
};

class Pool {
 public:
  explicit Pool(unsigned workers) {
    for (unsigned i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  // Never destroyed (see instance()): joining at interpreter exit buys nothing.

  void run(size_t n, const std::function<void(size_t)>& fn) {
    auto batch = std::make_shared<Batch>();
    batch->fn = &fn;
    batch->n = n;
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(batch);
    }
    wake_.notify_all();
    finish(*batch, drain(*batch));
    std::unique_lock<std::mutex> lk(mu_);
    batch->finished.wait(lk, [&] { return batch->done == batch->n; });
  }

 private:
  static size_t drain(Batch& b) {
    size_t ran = 0;
    for (size_t i; (i = b.next.fetch_add(1)) < b.n; ++ran) (*b.fn)(i);
    return ran;
  }

  void finish(Batch& b, size_t ran) {
    std::lock_guard<std::mutex> lk(mu_);
    // An exhausted batch leaves the queue; its owner may already have returned,
    // which is safe because nobody calls b.fn past b.n.
    if (!queue_.empty() && queue_.front().get() == &b) queue_.pop_front();
    b.done += ran;
    if (b.done == b.n) b.finished.notify_all();
  }

  void work() {
    for (;;) {
      std::shared_ptr<Batch> b;
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return !queue_.empty(); });
        b = queue_.front();
      }
      finish(*b, drain(*b));
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Batch>> queue_;
  std::vector<std::thread> threads_;
};

std::mutex g_mu;
Pool* g_pool = nullptr;

// Only the forking thread survives a fork: hold g_mu across it so the child
// inherits it unlocked, and let the child build a new pool (the old one is leaked).
void before_fork() { g_mu.lock(); }
void after_fork_parent() { g_mu.unlock(); }
void after_fork_child() {
  g_pool = nullptr;
  g_mu.unlock();
}

Pool& instance() {
  static const bool hooked = (pthread_atfork(before_fork, after_fork_parent, after_fork_child), true);
  (void)hooked;
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_pool == nullptr) g_pool = new Pool(std::min(usable_cpus(), kMaxThreads) - 1);
  return *g_pool;
}

}  // namespace

void parallel_for(size_t n_tasks, const std::function<void(size_t)>& fn) {
  if (n_tasks == 0) return;
  if (n_tasks == 1) {
    fn(0);
    return;
  }
  instance().run(n_tasks, fn);
}

unsigned pick_threads(unsigned requested, uint64_t total_bytes) {
  if (requested > 0) return std::min(requested, 4 * kMaxThreads);
  if (total_bytes < kSerialBelow) return 1;
  uint64_t by_size = total_bytes / kMinBytesPerTask;
  return static_cast<unsigned>(std::min<uint64_t>(std::min(usable_cpus(), kMaxThreads), by_size));
}

}  // namespace kvbm
