// The worker pool behind parallel_for: threads start on first use and live until exit.
#include "livetrain/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
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

int num_threads() {
  static int n = [] {
    if (const char* env = std::getenv("LIVETRAIN_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return n;
}

// Set while this thread runs a chunk: a nested parallel_for then runs serially instead of deadlocking.
thread_local bool t_in_parallel = false;

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, static_cast<int64_t>(num_threads()) * 4);
  if (chunks <= 1 || t_in_parallel) {
    fn(0, n);
    return;
  }
  int64_t per = (n + chunks - 1) / chunks;
  pool().run(static_cast<int>(chunks), [&](int c) {
    int64_t b = c * per, e = std::min(n, b + per);
    bool outer = t_in_parallel;
    t_in_parallel = true;
    try {
      if (b < e) fn(b, e);
    } catch (...) {
      t_in_parallel = outer;
      throw;
    }
    t_in_parallel = outer;
  });
}

}  // namespace livetrain
