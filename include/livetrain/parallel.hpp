// A process-wide pool of worker threads for the CPU paths (optimizer steps, checksums): parallel_for
// splits [0, n) into contiguous chunks, runs them on the pool and the calling thread, and returns when all
// are done. Exceptions thrown by a chunk are rethrown in the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>

namespace livetrain {

// Number of threads parallel_for uses: LIVETRAIN_NUM_THREADS, else available_cpus(). Fixed at the first call.
int num_threads();

// The CPUs this process may run on: the hardware's, fewer when its affinity mask (a container's cpuset,
// taskset) or a cgroup CPU quota (v2's cpu.max or v1's cpu.cfs_quota_us, of its cgroup or one above, rounded
// up) allows fewer. std::thread::hardware_concurrency alone counts every online CPU of the host, so a process
// given 16 of a 128-CPU host would run 128 threads on 16 CPUs, and every parallel region would wait for
// descheduled ones.
int available_cpus();

// The CPUs a cgroup v2 `cpu.max` text ("QUOTA PERIOD", or "max PERIOD": no quota) allows, rounded up; 0 for
// no quota or text that is not of that form.
int cpu_quota_cpus(std::string_view cpu_max);

// Calls fn(begin, end) over disjoint chunks covering [0, n), at least `grain` items each.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace livetrain
