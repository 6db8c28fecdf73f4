// A process-wide pool of worker threads for the CPU paths (optimizer steps, checksums): parallel_for
// splits [0, n) into contiguous chunks, runs them on the pool and the calling thread, and returns when all
// are done. Exceptions thrown by a chunk are rethrown in the caller.
#pragma once

#include <cstdint>
#include <functional>

namespace livetrain {

// Number of threads parallel_for uses (LIVETRAIN_NUM_THREADS, else the hardware's).
int num_threads();

// Calls fn(begin, end) over disjoint chunks covering [0, n), at least `grain` items each.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace livetrain
