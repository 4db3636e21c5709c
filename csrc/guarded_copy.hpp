// Copies between private memory and a MAP_SHARED mapping of a file another process controls
// (the daemon's staging windows), where a fault is the other process's doing, not a bug here.
//
// The other process holds the file open read-write: it can ftruncate it (pages past the new end
// raise SIGBUS on access) or fill its tmpfs (a first write to a hole raises SIGBUS). A plain
// memcpy would kill the copying process, and with it every other client's cache. Here each
// block is copied under a guard: a process-wide SIGBUS handler siglongjmps back into the copy
// only when the faulting thread is inside a guarded copy and the fault address lies in the
// guarded mapping; that block gets status EFAULT and the copy goes on with the next block.
// Any other SIGBUS (a real bug, a fault outside the mapping, a raise()) goes to the handler
// that was installed before ours (Python's faulthandler under pytest), and the process dies as
// it would have without us. Before each batch the handler is checked and reinstalled (chaining
// to whatever replaced it) if someone installed another since.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

// MAP_SHARED read-write mapping of fd's first nbytes; throws std::runtime_error on failure.
uint8_t* map_shared(int fd, size_t nbytes);
void unmap_shared(uint8_t* addr, size_t nbytes);

// to_map: map[map_offsets[i]:][:nbytes] = buf[buf_offsets[i]:][:nbytes], else the other way.
// status[i] = 0, or EFAULT when the mapping faulted inside block i (its destination may hold
// part of the data). Ranges are the caller's to check. threads as copy_blocks.
void guarded_copy_blocks(bool to_map, uint8_t* map, size_t map_len, const int64_t* map_offsets,
                         uint8_t* buf, const int64_t* buf_offsets, size_t n, int64_t nbytes,
                         unsigned threads, int32_t* status);

// True while our SIGBUS handler is the process's (tests).
bool sigbus_guard_installed();

}  // namespace kvbm
