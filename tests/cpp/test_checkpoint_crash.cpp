// Crash harness of the checkpoint store: a child saves or materializes in a loop and is killed with
// SIGKILL at a random instant (LIVETRAIN_KILL_ITERATIONS times each), or at each named crash point; then
// the store must open at exactly one committed generation whose content is what was saved, and every
// model file must hold the committed materialized generation, with no journal or temporary left.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <filesystem>
#include <random>
#include <thread>

#include "checkpoint_helpers.hpp"
#include "helpers.hpp"
#include "livetrain/error.hpp"

namespace checkpoint = livetrain::checkpoint;
using livetrain::testing::LiveModel;

namespace {

const int kOneThread = setenv("LIVETRAIN_NUM_THREADS", "1", 1);  // the pool must not exist across fork

int iterations() {
  const char* env = std::getenv("LIVETRAIN_KILL_ITERATIONS");
  return env ? std::atoi(env) : 40;
}

// The content of generation g: each generation changes 5% of the elements of the one before.
struct Expected {
  std::deque<LiveModel> states{livetrain::testing::make_live(7, 16)};  // deque: references stay valid
  const LiveModel& at(uint64_t g) {
    while (states.size() <= g) {
      LiveModel next = states.back();
      livetrain::testing::perturb(next, 1000 + states.size(), 0.05);
      states.push_back(std::move(next));
    }
    return states[g];
  }
};

[[noreturn]] void child_save(const std::string& model) {
  checkpoint::Store s = checkpoint::Store::open(model);
  Expected exp;
  LiveModel live = exp.at(0);
  s.restore_live(s.commit().head, live.views());
  for (uint64_t g = s.commit().head + 1;; ++g) {
    live = exp.at(g);
    checkpoint::SaveOptions o;
    o.weight_version = g;
    s.save(live.views(), o);
  }
}

[[noreturn]] void child_materialize(const std::string& model, uint64_t seed) {
  checkpoint::Store s = checkpoint::Store::open(model);
  std::mt19937_64 rng(seed);
  for (;;) s.materialize(rng() % (s.commit().head + 1));
}

// Runs `fn` in a child killed after `delay_us` (or when it dies by itself at a crash point).
void run_and_kill(const std::function<void()>& fn, int delay_us, const char* crash_at = nullptr) {
  pid_t pid = fork();
  if (pid == 0) {
    if (crash_at) setenv("LIVETRAIN_CHECKPOINT_CRASH_AT", crash_at, 1);
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child: %s\n", e.what());
      _exit(3);
    }
    _exit(0);
  }
  if (delay_us >= 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    kill(pid, SIGKILL);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the child failed on its own (exit " << WEXITSTATUS(status) << ")";
}

// Opens the store (recovering) and checks it against the expected generations.
void check(const std::string& model, Expected& exp, const LiveModel& like) {
  checkpoint::Store s = checkpoint::Store::open(model);
  const checkpoint::Commit& c = s.commit();
  EXPECT_FALSE(std::filesystem::exists(s.dir() + "/materialize.journal"));
  for (const auto& e : std::filesystem::directory_iterator(s.dir())) {
    EXPECT_FALSE(livetrain::fs::is_atomic_temp_name(e.path().filename().string())) << e.path();
  }
  LiveModel head = exp.at(c.head);
  EXPECT_EQ(s.compare_live(c.head, head.views()).tensors, 0u) << "head " << c.head;
  EXPECT_EQ(c.generations.back().weight_version, c.head);
  // The model files hold exactly the committed materialized generation.
  livetrain::safetensors::Model m = livetrain::safetensors::Model::open(model);
  const LiveModel& mat = exp.at(c.materialized);
  for (size_t i = 0; i < like.names.size(); ++i) {
    const auto& e = m.tensor(like.names[i]);
    ASSERT_EQ(0, std::memcmp(e.file->data(*e.info), mat.data[i].data(), mat.data[i].size()))
        << like.names[i] << " at materialized " << c.materialized;
  }
}

}  // namespace

TEST(CheckpointCrash, KilledAtRandomInstants) {
  (void)kOneThread;
  livetrain::testing::TempDir tmp;
  std::string model = tmp.file("model");
  Expected exp;
  livetrain::testing::write_model_dir(model, exp.at(0));
  { checkpoint::Store::create(model); }
  std::mt19937_64 rng(42);
  int n = iterations();
  for (int i = 0; i < n; ++i) {
    run_and_kill([&] { child_save(model); }, static_cast<int>(rng() % 30000));
    check(model, exp, exp.at(0));
    if (HasFatalFailure()) return;
    run_and_kill([&] { child_materialize(model, rng()); }, static_cast<int>(rng() % 30000));
    check(model, exp, exp.at(0));
    if (HasFatalFailure()) return;
  }
  std::printf("[ measured ] %d kills; store reached generation %llu\n", 2 * n,
              static_cast<unsigned long long>(checkpoint::commit_read(checkpoint::default_store_dir(model)).head));
}

TEST(CheckpointCrash, KilledAtEachCrashPoint) {
  livetrain::testing::TempDir tmp;
  std::string model = tmp.file("model");
  Expected exp;
  livetrain::testing::write_model_dir(model, exp.at(0));
  { checkpoint::Store::create(model); }
  run_and_kill([&] { child_save(model); }, -1, "delta-written");
  check(model, exp, exp.at(0));
  EXPECT_EQ(checkpoint::commit_read(checkpoint::default_store_dir(model)).head, 0u) << "an uncommitted delta is ignored";
  // Three committed generations to move between.
  {
    checkpoint::Store s = checkpoint::Store::open(model);
    for (uint64_t g = 1; g <= 3; ++g) {
      checkpoint::SaveOptions o;
      o.weight_version = g;
      LiveModel live = exp.at(g);
      s.save(live.views(), o);
    }
  }
  uint64_t target = 3;
  for (const char* point : {"journal-written", "apply-half", "applied", "materialize-committed"}) {
    run_and_kill([&] { checkpoint::Store::open(model).materialize(target); }, -1, point);
    // A crash in the middle of recovery, too.
    if (std::string(point) == "apply-half") {
      run_and_kill([&] { checkpoint::Store::open(model); }, -1, "recovered-applied");
    }
    check(model, exp, exp.at(0));
    EXPECT_EQ(checkpoint::commit_read(checkpoint::default_store_dir(model)).materialized, target) << point;
    target = target == 3 ? 1 : 3;
  }
}
