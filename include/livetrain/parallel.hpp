// A process-wide pool of worker threads for the CPU paths (optimizer steps, checksums): parallel_for
// splits [0, n) into contiguous chunks, runs them on the pool and the calling thread, and returns when all
// are done. Exceptions thrown by a chunk are rethrown in the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
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

// Names the calling thread (at most 15 characters on Linux; a no-op elsewhere), so that per-thread CPU time
// (/proc/PID/task, top -H, bench/save_usage.py) tells the core's threads apart: "lt-pool" (parallel_for's
// workers), "lt-encode" and "lt-write" (a checkpoint save's encoder and early writer).
void name_this_thread(const char* name);

// Calls fn(begin, end) over disjoint chunks covering [0, n), at least `grain` items each.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// What threads used while running some work (getrusage; Linux's per-thread counts for a thread, the whole
// process's for RUSAGE_SELF), against the wall time they ran it. CPU time below the wall time means the
// threads were off their CPUs: descheduled for other threads or processes, or blocked (major faults, locks).
struct Usage {
  double wall_seconds = 0;    // thread-seconds: each chunk's wall time, summed over the threads
  double user_seconds = 0;    // CPU time in user mode
  double system_seconds = 0;  // CPU time in the kernel: page faults (zeroing, reclaim), system calls
  uint64_t minor_faults = 0, major_faults = 0;
  uint64_t voluntary_switches = 0;    // times a thread blocked (a lock, a major fault, I/O)
  uint64_t involuntary_switches = 0;  // times the scheduler took the CPU away (another thread was runnable)
  Usage& operator+=(const Usage& o);
  Usage operator-(const Usage& o) const;
  // Calls f(name, member pointer) for every field above, by its name in Python (the bindings' dicts): the one
  // list of them, for the arithmetic and the bindings alike.
  template <typename F>
  static void each_field(F&& f) {
    f("wall_seconds", &Usage::wall_seconds);
    f("user_seconds", &Usage::user_seconds);
    f("system_seconds", &Usage::system_seconds);
    f("minor_faults", &Usage::minor_faults);
    f("major_faults", &Usage::major_faults);
    f("voluntary_switches", &Usage::voluntary_switches);
    f("involuntary_switches", &Usage::involuntary_switches);
  }
};

// This thread's usage so far (wall_seconds: a steady clock's time), or the process's (every thread) with
// `process`.
Usage usage_now(bool process = false);

// Sums the usage of every parallel_for chunk run for a thread that made it current (UsageScope): on the
// pool's threads and the caller alike. Only outermost calls count (a nested parallel_for runs in its chunk).
class UsageAccount {
 public:
  Usage total() const {
    std::lock_guard<std::mutex> lock(mu_);
    return total_;
  }
  void add(const Usage& u) {
    std::lock_guard<std::mutex> lock(mu_);
    total_ += u;
  }

 private:
  mutable std::mutex mu_;
  Usage total_;
};

// Makes `account` the calling thread's for its parallel_for calls while this lives.
class UsageScope {
 public:
  explicit UsageScope(UsageAccount* account);
  ~UsageScope();
  UsageScope(const UsageScope&) = delete;
  UsageScope& operator=(const UsageScope&) = delete;

 private:
  UsageAccount* outer_;
};

}  // namespace livetrain
