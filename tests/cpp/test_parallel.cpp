// The worker pool's size (livetrain/parallel.hpp): the CPUs this process may run on, not the host's.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

#include "livetrain/parallel.hpp"

namespace {

// In a child process given one CPU (no LIVETRAIN_NUM_THREADS): available_cpus() and num_threads() are 1 (exit 0),
// whatever the host has. Before, num_threads() was std::thread::hardware_concurrency(): every online CPU.
TEST(Parallel, ThreadsFollowTheAffinityMask) {
  cpu_set_t mine;
  ASSERT_EQ(sched_getaffinity(0, sizeof(mine), &mine), 0);
  int first = 0;
  while (!CPU_ISSET(first, &mine)) ++first;
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    unsetenv("LIVETRAIN_NUM_THREADS");
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    if (sched_setaffinity(0, sizeof(one), &one) != 0) _exit(2);
    const int cpus = livetrain::available_cpus(), threads = livetrain::num_threads();
    _exit(cpus == 1 && threads == 1 ? 0 : 10 + std::min(cpus, 100));
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "available_cpus() in the child was " << WEXITSTATUS(status) - 10
                                    << " with one CPU allowed (the host has " << std::thread::hardware_concurrency()
                                    << ")";
  EXPECT_GE(livetrain::available_cpus(), 1);
  EXPECT_LE(livetrain::available_cpus(), static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

TEST(Parallel, CpuQuotaTextIsRoundedUp) {
  EXPECT_EQ(livetrain::cpu_quota_cpus("max 100000\n"), 0);
  EXPECT_EQ(livetrain::cpu_quota_cpus("1600000 100000\n"), 16);
  EXPECT_EQ(livetrain::cpu_quota_cpus("150000 100000"), 2);
  EXPECT_EQ(livetrain::cpu_quota_cpus("50000 100000\n"), 1);
  EXPECT_EQ(livetrain::cpu_quota_cpus(""), 0);
  EXPECT_EQ(livetrain::cpu_quota_cpus("100000"), 0);
  EXPECT_EQ(livetrain::cpu_quota_cpus("0 100000"), 0);
  EXPECT_EQ(livetrain::cpu_quota_cpus("x 100000"), 0);
  EXPECT_EQ(livetrain::cpu_quota_cpus("100000 0"), 0);
}

// Spins about `seconds` of CPU time on the calling thread.
void spin(double seconds) {
  const livetrain::Usage start = livetrain::usage_now();
  volatile uint64_t x = 0;
  while (true) {
    for (int i = 0; i < 100000; ++i) x = x + static_cast<uint64_t>(i);
    const livetrain::Usage now = livetrain::usage_now() - start;
    if (now.user_seconds + now.system_seconds >= seconds) return;
  }
}

// A UsageAccount counts the chunks of the parallel_for calls its thread makes (on every thread that runs them),
// each once (a nested call inside a chunk is part of that chunk), and nothing after its scope ends.
TEST(Parallel, UsageAccountCountsTheScopesChunks) {
  livetrain::UsageAccount account;
  std::atomic<int> chunks{0};
  {
    livetrain::UsageScope scope(&account);
    livetrain::parallel_for(4, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        livetrain::parallel_for(8, 1, [](int64_t, int64_t) {});  // nested: runs serially, not counted again
        spin(0.02);
        ++chunks;
      }
    });
  }
  livetrain::parallel_for(4, 1, [](int64_t, int64_t) { spin(0.02); });  // no scope: not counted
  const livetrain::Usage u = account.total();
  EXPECT_EQ(chunks.load(), 4);
  // Four chunks of ~0.02 s of CPU each; getrusage's per-thread times are exact to the scheduler's accounting.
  EXPECT_GE(u.user_seconds + u.system_seconds, 0.06);
  EXPECT_LT(u.user_seconds + u.system_seconds, 0.14);
  EXPECT_GE(u.wall_seconds, u.user_seconds + u.system_seconds - 0.01);

  // The process's usage counts every thread, this one's its own.
  const livetrain::Usage before = livetrain::usage_now(true), mine = livetrain::usage_now();
  std::thread other([] { spin(0.05); });
  other.join();
  const livetrain::Usage process = livetrain::usage_now(true) - before, own = livetrain::usage_now() - mine;
  EXPECT_GE(process.user_seconds + process.system_seconds, 0.045);
  EXPECT_LT(own.user_seconds + own.system_seconds, 0.04);
}

}  // namespace
