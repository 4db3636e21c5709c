// A small process-wide worker pool for the batched host ops.
//
// Batches are split into a few coarse tasks; the calling thread runs tasks too, so
// a call always finishes even if the workers are busy with another caller's batch
// (or were lost in a fork: the child gets a fresh pool).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace kvbm {

// Runs fn(i) for every i in [0, n_tasks) on the pool and the calling thread; returns
// when all are done. fn must not throw.
void parallel_for(size_t n_tasks, const std::function<void(size_t)>& fn);

// How many tasks to split `total_bytes` of work into. requested == 0 picks
// automatically: 1 below kSerialBelow, else up to min(cpus, 8).
unsigned pick_threads(unsigned requested, uint64_t total_bytes);

constexpr uint64_t kSerialBelow = 1u << 20;  // thread hand-off costs more than copying 1 MiB

}  // namespace kvbm
