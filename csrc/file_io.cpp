#include "file_io.hpp"

#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "crc32c.hpp"
#include "thread_pool.hpp"

namespace kvbm {
namespace {

constexpr uint64_t kMaxRunBytes = 8u << 20;  // one merged syscall; larger buys nothing
constexpr uint64_t kAioRunBytes = 2u << 20;  // one AIO request: the device splits larger ones
constexpr unsigned kAioDepth = 32;           // AIO requests in flight per call
#ifndef KVBM_AIO_CHECKED_READ_BYTES
#define KVBM_AIO_CHECKED_READ_BYTES (8u << 20)
#endif
// Bytes in flight for a read whose runs are checksummed as they land: a device that
// completes what it was given in one go (a VM's virtio disk) otherwise hands back the
// whole batch at once and the checksums start only then. 8 MiB still fills an NVMe drive.
constexpr uint64_t kAioCheckedReadBytes = KVBM_AIO_CHECKED_READ_BYTES;
constexpr size_t kMaxIov = 1024;             // IOV_MAX on Linux

int64_t align_up(int64_t n) { return (n + kDirectAlign - 1) / kDirectAlign * kDirectAlign; }

bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0; }

// pwrite until all len bytes are in, retrying EINTR and short writes.
int write_all(int fd, const uint8_t* p, size_t len, int64_t off) {
  while (len > 0) {
    const ssize_t r = ::pwrite(fd, p, len, off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return EIO;  // no progress and no errno: do not spin
    p += r, len -= r, off += r;
  }
  return 0;
}

// pread of len bytes, done once `need` arrived: the rest is O_DIRECT padding, which may lie
// past the end of the file (and a read after a short one would start unaligned).
int read_all(int fd, uint8_t* p, size_t len, size_t need, int64_t off) {
  size_t got = 0;
  while (got < need) {
    const ssize_t r = ::pread(fd, p + got, len - got, off + static_cast<int64_t>(got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return ENODATA;
    got += static_cast<size_t>(r);
  }
  return 0;
}

// An aligned scratch block, one per task, made on first use.
class Bounce {
 public:
  ~Bounce() { std::free(p_); }
  uint8_t* get(size_t len) {
    if (p_ == nullptr && posix_memalign(reinterpret_cast<void**>(&p_), kDirectAlign, len) != 0)
      p_ = nullptr;
    return p_;
  }

 private:
  uint8_t* p_ = nullptr;
};

struct Run {
  size_t first, count;
};

struct Job {
  bool write;
  int fd;
  bool direct;
  uint8_t* const* bufs;
  const int64_t* offs;
  size_t n;
  int64_t nbytes;
  int32_t* status;
  uint32_t* crcs;

  bool needs_bounce(size_t i) const {
    return direct && (nbytes % kDirectAlign != 0 || !is_aligned(bufs[i]));
  }

  uint32_t crc_of(size_t i) const { return crc32c(0, bufs[i], static_cast<size_t>(nbytes)); }

  // Moves block i alone. A block that needs the bounce buffer (an unaligned buffer or size
  // under O_DIRECT) is copied through it with its CRC-32C taken in the same pass
  // (copy_crc32c), instead of a copy and then a second read of the block for the checksum.
  int single(size_t i, Bounce& bounce) const {
    const auto len = static_cast<size_t>(nbytes);
    if (!needs_bounce(i))
      return write ? write_all(fd, bufs[i], len, offs[i]) : read_all(fd, bufs[i], len, len, offs[i]);
    const auto padded = static_cast<size_t>(align_up(nbytes));
    uint8_t* p = bounce.get(padded);
    if (p == nullptr) {
      if (crcs) crcs[i] = write ? crc_of(i) : 0;
      return ENOMEM;
    }
    if (write) {
      if (crcs)
        crcs[i] = copy_crc32c(p, bufs[i], len, 0);
      else
        std::memcpy(p, bufs[i], len);
      std::memset(p + len, 0, padded - len);
      return write_all(fd, p, padded, offs[i]);
    }
    const int err = read_all(fd, p, padded, len, offs[i]);
    if (err == 0) {  // a failed read leaves the buffer alone
      if (crcs)
        crcs[i] = copy_crc32c(bufs[i], p, len, 0);
      else
        std::memcpy(bufs[i], p, len);
    } else if (crcs) {
      crcs[i] = 0;
    }
    return err;
  }

  void run(const Run& r, Bounce& bounce, std::vector<iovec>& iov) const {
    const size_t end = r.first + r.count;
    // of the source bytes, in the task: the checksum overlaps other I/O (single() takes a
    // bounced block's with its copy)
    if (write && crcs)
      for (size_t i = r.first; i < end; ++i)
        if (!needs_bounce(i)) crcs[i] = crc_of(i);
    bool done = false;
    if (r.count > 1) {
      iov.clear();
      for (size_t i = r.first; i < end; ++i) iov.push_back({bufs[i], static_cast<size_t>(nbytes)});
      const auto total = static_cast<ssize_t>(r.count * static_cast<size_t>(nbytes));
      ssize_t got;
      do {
        got = write ? ::pwritev(fd, iov.data(), static_cast<int>(r.count), offs[r.first])
                    : ::preadv(fd, iov.data(), static_cast<int>(r.count), offs[r.first]);
      } while (got < 0 && errno == EINTR);
      done = got == total;
    }
    for (size_t i = r.first; i < end; ++i) {
      // A merged call that failed or came up short is redone block by block, so the
      // blocks that can move do, and each failed one gets its own errno.
      status[i] = done ? 0 : single(i, bounce);
      if (!write && crcs && !needs_bounce(i)) crcs[i] = status[i] == 0 ? crc_of(i) : 0;
    }
  }
};

// Groups neighbouring blocks that need no bounce into runs of at most max_bytes.
std::vector<Run> plan_runs(const Job& job, uint64_t max_bytes) {
  const auto len = static_cast<uint64_t>(job.nbytes);
  const uint64_t cap = std::max(len, max_bytes);
  std::vector<Run> runs;
  for (size_t i = 0; i < job.n;) {
    size_t j = i + 1;
    if (!job.needs_bounce(i))
      while (j < job.n && j - i < kMaxIov && (j - i + 1) * len <= cap && !job.needs_bounce(j) &&
             job.offs[j] == job.offs[j - 1] + job.nbytes)
        ++j;
    runs.push_back({i, j - i});
    i = j;
  }
  return runs;
}

// ---- Linux AIO: O_DIRECT I/O is truly asynchronous, so one thread keeps a deep queue ----
//
// A thread pool sized for memory copies (one worker per CPU) gives an NVMe drive a queue
// depth of a few; kernel AIO gives it kAioDepth from one thread. Checksums run beside the
// I/O: a write's on the I/O thread once all its runs are in flight (no hand-off to a pool
// worker that, on a busy 2-core box, woke late enough that the I/O and then every checksum
// ran in series), a read's on a second task as each run lands (see aio_runs).

struct AioContext {
  aio_context_t ctx = 0;
  pid_t owner = 0;  // a forked child must not use its parent's context
  ~AioContext() {
    if (ctx != 0 && owner == ::getpid()) syscall(SYS_io_destroy, ctx);
  }
  // The calling thread's context, or 0 where AIO is unavailable (seccomp, aio-max-nr).
  static aio_context_t get() {
    thread_local AioContext c;
    if (c.ctx != 0 && c.owner == ::getpid()) return c.ctx;
    c.ctx = 0;
    if (syscall(SYS_io_setup, kAioDepth, &c.ctx) != 0) c.ctx = 0;
    c.owner = ::getpid();
    return c.ctx;
  }
};

// Moves the runs (none needs a bounce) with AIO on this thread's context. Each run's blocks
// get their status before on_done(r); a run that fails or comes up short, or that AIO
// refuses (no context, say), is redone block by block (Job::single). work() is called
// whenever the queue is as full as it may be: it does one piece of other work (a checksum)
// and returns true, or false when there is none, and then this thread sleeps on the device.
template <typename OnDone, typename Work>
void aio_move(const Job& job, const std::vector<Run>& runs, OnDone on_done, Work work) {
  const aio_context_t ctx = AioContext::get();
  const auto len = static_cast<size_t>(job.nbytes);
  std::vector<iovec> iov(job.n);
  for (size_t i = 0; i < job.n; ++i) iov[i] = {job.bufs[i], len};
  std::vector<iocb> cbs(runs.size());
  io_event events[kAioDepth];
  Bounce bounce;  // for redone blocks only
  std::vector<char> done(runs.size(), 0);
  size_t next = 0, inflight = 0, finished = 0;
  uint64_t inflight_bytes = 0;
  const uint64_t max_bytes = !job.write && job.crcs ? kAioCheckedReadBytes : std::numeric_limits<uint64_t>::max();
  auto finish = [&](size_t r, bool ok) {
    for (size_t i = runs[r].first; i < runs[r].first + runs[r].count; ++i)
      job.status[i] = ok ? 0 : job.single(i, bounce);
    done[r] = 1;
    on_done(r);
    ++finished;
  };
  while (finished < runs.size()) {
    while (next < runs.size() && inflight < kAioDepth && (inflight == 0 || inflight_bytes < max_bytes)) {
      const Run& run = runs[next];
      iocb& cb = cbs[next];
      cb = iocb{};
      cb.aio_data = next;
      cb.aio_lio_opcode = job.write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
      cb.aio_fildes = static_cast<uint32_t>(job.fd);
      cb.aio_buf = reinterpret_cast<uint64_t>(&iov[run.first]);
      cb.aio_nbytes = run.count;
      cb.aio_offset = job.offs[run.first];
      iocb* one = &cb;
      long r = -1;
      if (ctx != 0) {
        do {
          r = syscall(SYS_io_submit, ctx, 1L, &one);
        } while (r < 0 && errno == EINTR);
      }
      if (r == 1) {
        ++inflight, ++next;
        inflight_bytes += run.count * len;
        continue;
      }
      if (r < 0 && errno == EAGAIN && inflight > 0) break;  // reap first, then submit it again
      finish(next++, false);  // refused: done by hand
    }
    if (inflight == 0) continue;
    // Other work first, then whatever landed meanwhile; sleep only when there is none.
    const bool worked = work();
    timespec now{0, 0};
    long got;
    do {
      got = syscall(SYS_io_getevents, ctx, worked ? 0L : 1L, static_cast<long>(kAioDepth), events,
                    worked ? &now : nullptr);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {  // only for a broken context: no more events will come
      for (size_t r = 0; r < runs.size(); ++r)
        if (!done[r]) on_done(r);  // its blocks keep their EIO
      break;
    }
    for (long e = 0; e < got; ++e) {
      const size_t r = events[e].data;
      --inflight;
      inflight_bytes -= runs[r].count * len;
      finish(r, events[e].res == static_cast<int64_t>(runs[r].count * len));
    }
  }
  while (work()) {
  }
}

// AIO for the runs, with their checksums; false (nothing done) without AIO.
bool aio_runs(const Job& job, const std::vector<Run>& runs) {
  if (AioContext::get() == 0) return false;
  auto none = [] { return false; };
  if (job.crcs == nullptr) {
    aio_move(job, runs, [](size_t) {}, none);
    return true;
  }
  auto checksum = [&](size_t r) {
    for (size_t i = runs[r].first; i < runs[r].first + runs[r].count; ++i)
      job.crcs[i] = job.write || job.status[i] == 0 ? job.crc_of(i) : 0;
  };
  if (job.write) {
    // Every run goes in flight at once, so the device never waits on this thread: it
    // checksums the sources meanwhile, in run order.
    size_t next = 0;
    aio_move(job, runs, [](size_t) {}, [&] {
      if (next == runs.size()) return false;
      checksum(next++);
      return true;
    });
    return true;
  }
  // A read keeps kAioCheckedReadBytes in flight, so the thread that refills the queue must
  // stay light: one busy checksumming is preempted on a loaded box while the device idles
  // (0.51x NIXL at load 13). So the I/O task only reaps and refills, and a second task
  // checksums each run as it lands, sleeping meanwhile (spinning would take the CPU that, in
  // a VM, the host's emulation of the disk runs on). The I/O task joins in once it is done.
  std::vector<size_t> landed(runs.size());
  std::atomic<size_t> claimed{0};
  std::mutex mu;
  std::condition_variable arrived;
  size_t published = 0;  // guarded by mu
  auto on_done = [&](size_t r) {
    {
      std::lock_guard<std::mutex> lk(mu);
      landed[published++] = r;
    }
    arrived.notify_all();
  };
  auto checksums = [&] {
    for (size_t k; (k = claimed.fetch_add(1)) < runs.size();) {
      std::unique_lock<std::mutex> lk(mu);
      arrived.wait(lk, [&] { return published > k; });
      const size_t r = landed[k];
      lk.unlock();
      checksum(r);
    }
  };
  // With no pool worker, the tasks run one after the other on this thread: I/O first.
  parallel_for(2, [&](size_t t) {
    if (t == 0) aio_move(job, runs, on_done, none);
    checksums();
  });
  return true;
}

void io_blocks(const Job& job, unsigned threads) {
  if (job.n == 0) return;
  std::fill(job.status, job.status + job.n, EIO);  // until a block is known to have moved
  if (job.nbytes == 0) {
    std::fill(job.status, job.status + job.n, 0);
    if (job.crcs) std::fill(job.crcs, job.crcs + job.n, 0u);
    return;
  }
  if (job.direct && threads != 1) {
    std::vector<Run> runs = plan_runs(job, kAioRunBytes), sync;
    std::vector<Run> aio;
    for (const Run& r : runs) (job.needs_bounce(r.first) ? sync : aio).push_back(r);
    // Only bounced blocks (a block size O_DIRECT cannot take): the thread pool below moves
    // them, several at a time, each task with its own bounce buffer.
    if (!aio.empty() && aio_runs(job, aio)) {
      Bounce bounce;
      std::vector<iovec> iov;
      for (const Run& r : sync) job.run(r, bounce, iov);
      return;
    }
  }
  // Leave at least one run per thread, so a short batch still spreads.
  const uint64_t total = static_cast<uint64_t>(job.nbytes) * job.n;
  const std::vector<Run> runs = plan_runs(job, std::min(kMaxRunBytes, total / std::max(1u, threads)));
  const size_t tasks = std::min<size_t>(std::max(1u, threads), runs.size());
  std::atomic<size_t> next{0};
  auto task = [&](size_t) {
    Bounce bounce;
    std::vector<iovec> iov;
    for (size_t r; (r = next.fetch_add(1)) < runs.size();) job.run(runs[r], bounce, iov);
  };
  if (tasks <= 1)
    task(0);
  else
    parallel_for(tasks, task);
}

}  // namespace

void check_file_offsets(const char* op, const int64_t* file_offsets, size_t n, int64_t nbytes) {
  const int64_t limit = std::numeric_limits<int64_t>::max() - align_up(nbytes);
  for (size_t i = 0; i < n; ++i) {
    const int64_t off = file_offsets[i];
    if (off < 0 || off > limit)
      throw std::invalid_argument(std::string(op) + ": file_offsets[" + std::to_string(i) + "] = " +
                                  std::to_string(off) +
                                  (off < 0 ? " is negative" : " + nbytes overflows a file offset"));
  }
}

bool fd_is_direct(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT) != 0;
}

void pwrite_blocks(int fd, const uint8_t* const* bufs, const int64_t* file_offsets, size_t n,
                   int64_t nbytes, unsigned threads, int32_t* status, uint32_t* crcs) {
  // Job holds non-const pointers for both directions; a write only reads through them.
  Job job{true, fd, fd_is_direct(fd), const_cast<uint8_t* const*>(bufs), file_offsets, n, nbytes,
          status, crcs};
  io_blocks(job, threads);
}

void pread_blocks(int fd, uint8_t* const* bufs, const int64_t* file_offsets, size_t n,
                  int64_t nbytes, unsigned threads, int32_t* status, uint32_t* crcs) {
  Job job{false, fd, fd_is_direct(fd), bufs, file_offsets, n, nbytes, status, crcs};
  io_blocks(job, threads);
}

}  // namespace kvbm
