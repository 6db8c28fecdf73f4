// The worker pool's size (livetrain/parallel.hpp): the CPUs this process may run on, not the host's.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

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

}  // namespace
