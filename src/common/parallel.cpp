// The worker pool behind parallel_for: threads start on first use and live until exit.
#include "livetrain/parallel.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace livetrain {

namespace {

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Runs task(i) for i in [0, count) on the workers and the caller.
  void run(int count, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> serial(run_mu_);  // one parallel region at a time
    auto job = std::make_shared<Job>();
    job->task = &task;
    job->count = count;
    job->pending = count;
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = job;
    }
    cv_.notify_all();
    work(*job);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return job->pending == 0; });
    current_.reset();
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  // One parallel region. A worker that wakes late holds its own reference and finds no index left.
  struct Job {
    const std::function<void(int)>* task = nullptr;
    int count = 0;
    std::atomic<int> next{0};
    int pending = 0;  // guarded by mu_
    std::exception_ptr error;
  };

  void work(Job& job) {
    while (true) {
      int i = job.next.fetch_add(1);
      if (i >= job.count) return;
      std::exception_ptr err;
      try {
        (*job.task)(i);
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (err && !job.error) job.error = err;
      if (--job.pending == 0) done_cv_.notify_all();
    }
  }

  void loop() {
    name_this_thread("lt-pool");
    std::shared_ptr<Job> last;
    while (true) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || (current_ && current_ != last); });
        if (stop_) return;
        job = current_;
      }
      last = job;
      work(*job);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_, done_cv_;
  std::shared_ptr<Job> current_;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p(num_threads() - 1);
  return p;
}

}  // namespace

int cpu_quota_cpus(std::string_view cpu_max) {
  // "max PERIOD" (no quota) or "QUOTA PERIOD", both in microseconds.
  const size_t space = cpu_max.find(' ');
  if (space == std::string_view::npos) return 0;
  const std::string_view quota = cpu_max.substr(0, space);
  std::string_view period = cpu_max.substr(space + 1);
  while (!period.empty() && (period.back() == '\n' || period.back() == ' ')) period.remove_suffix(1);
  auto number = [](std::string_view v, uint64_t& out) {
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
    return ec == std::errc() && end == v.data() + v.size() && out > 0;
  };
  uint64_t q = 0, p = 0;
  if (!number(quota, q) || !number(period, p)) return 0;
  return static_cast<int>(std::min<uint64_t>((q + p - 1) / p, 1 << 20));
}

namespace {

std::string read_small_file(const std::string& path) {
  std::ifstream f(path);
  std::string text;
  std::getline(f, text, '\0');
  return text;
}

// The fewest CPUs a CPU quota of this process's cgroup or of one above it allows: cgroup v2's cpu.max, or v1's
// cpu.cfs_quota_us and cpu.cfs_period_us of the cpu controller; 0 when none is set or none can be read.
int cgroup_quota_cpus() {
  std::string v2, v1, v1_mount;
  {
    std::istringstream lines(read_small_file("/proc/self/cgroup"));
    for (std::string line; std::getline(lines, line);) {
      // "ID:CONTROLLERS:PATH"; the unified (v2) hierarchy has ID 0 and no controllers.
      const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
      if (b == std::string::npos) continue;
      const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
      if (line.rfind("0::", 0) == 0) v2 = path;
      std::istringstream names(controllers);
      for (std::string name; std::getline(names, name, ',');) {
        if (name == "cpu") v1 = path, v1_mount = "/sys/fs/cgroup/" + controllers;
      }
    }
  }
  int fewest = 0;
  auto each_level = [&](std::string path, const std::function<int(const std::string&)>& cpus) {
    if (path.empty() || path[0] != '/') return;
    while (true) {
      const int n = cpus(path == "/" ? std::string() : path);
      if (n > 0 && (fewest == 0 || n < fewest)) fewest = n;
      if (path == "/") return;
      const size_t slash = path.rfind('/');
      path = slash == 0 ? "/" : path.substr(0, slash);
    }
  };
  each_level(
      v2, [](const std::string& dir) { return cpu_quota_cpus(read_small_file("/sys/fs/cgroup" + dir + "/cpu.max")); });
  if (v1_mount.empty()) return fewest;
  // The cpu controller's hierarchy where /proc/self/cgroup's controller list names it, else at the usual
  // name (the same directory, most often, through a symlink: read once).
  // (A plain stat, not fs::is_directory: the pool is below the file layer; the fuzz targets link it without.)
  struct stat st;
  const std::string mount = ::stat(v1_mount.c_str(), &st) == 0 ? v1_mount : std::string("/sys/fs/cgroup/cpu");
  each_level(v1, [&](const std::string& dir) {
    std::string quota = read_small_file(mount + dir + "/cpu.cfs_quota_us"),
                period = read_small_file(mount + dir + "/cpu.cfs_period_us");
    while (!quota.empty() && quota.back() == '\n') quota.pop_back();
    return cpu_quota_cpus(quota + " " + period);  // a quota of -1 (none) is no number: 0
  });
  return fewest;
}

}  // namespace

int available_cpus() {
  int n = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) n = std::min(n, CPU_COUNT(&set));
#endif
  if (const int quota = cgroup_quota_cpus(); quota > 0) n = std::min(n, quota);
  return n;
}

int num_threads() {
  static int n = [] {
    if (const char* env = std::getenv("LIVETRAIN_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    return available_cpus();
  }();
  return n;
}

void name_this_thread(const char* name) {
#ifdef __linux__
  pthread_setname_np(pthread_self(), name);
#else
  (void)name;
#endif
}

Usage& Usage::operator+=(const Usage& o) {
  each_field([&](const char*, auto field) { this->*field += o.*field; });
  return *this;
}

Usage Usage::operator-(const Usage& o) const {
  Usage d;
  each_field([&](const char*, auto field) { d.*field = this->*field - o.*field; });
  return d;
}

Usage usage_now(bool process) {
  Usage u;
  u.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  struct rusage r {};
#ifdef RUSAGE_THREAD
  const int who = process ? RUSAGE_SELF : RUSAGE_THREAD;
#else
  const int who = RUSAGE_SELF;
#endif
  if (::getrusage(who, &r) != 0) return u;
  u.user_seconds = static_cast<double>(r.ru_utime.tv_sec) + static_cast<double>(r.ru_utime.tv_usec) * 1e-6;
  u.system_seconds = static_cast<double>(r.ru_stime.tv_sec) + static_cast<double>(r.ru_stime.tv_usec) * 1e-6;
  u.minor_faults = static_cast<uint64_t>(r.ru_minflt);
  u.major_faults = static_cast<uint64_t>(r.ru_majflt);
  u.voluntary_switches = static_cast<uint64_t>(r.ru_nvcsw);
  u.involuntary_switches = static_cast<uint64_t>(r.ru_nivcsw);
  return u;
}

// Set while this thread runs a chunk: a nested parallel_for then runs serially instead of deadlocking.
thread_local bool t_in_parallel = false;
// The account of this thread's parallel_for calls (UsageScope), or none.
thread_local UsageAccount* t_account = nullptr;

UsageScope::UsageScope(UsageAccount* account) : outer_(t_account) { t_account = account; }
UsageScope::~UsageScope() { t_account = outer_; }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, static_cast<int64_t>(num_threads()) * 4);
  // Two getrusage calls per chunk (a microsecond or so) where an account asks for them; chunks are at most
  // 4 per thread and region.
  UsageAccount* const account = t_in_parallel ? nullptr : t_account;
  auto counted = [account](auto&& run) {  // a template: no std::function (a heap allocation) per chunk
    if (!account) return run();
    const Usage before = usage_now();
    try {
      run();
    } catch (...) {
      account->add(usage_now() - before);
      throw;
    }
    account->add(usage_now() - before);
  };
  if (chunks <= 1 || t_in_parallel) {
    counted([&] { fn(0, n); });
    return;
  }
  int64_t per = (n + chunks - 1) / chunks;
  pool().run(static_cast<int>(chunks), [&](int c) {
    int64_t b = c * per, e = std::min(n, b + per);
    bool outer = t_in_parallel;
    t_in_parallel = true;
    try {
      if (b < e) counted([&] { fn(b, e); });
    } catch (...) {
      t_in_parallel = outer;
      throw;
    }
    t_in_parallel = outer;
  });
}

}  // namespace livetrain
