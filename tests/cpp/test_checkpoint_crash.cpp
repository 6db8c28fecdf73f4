// Crash harness of the checkpoint store: a child saves or materializes in a loop and is killed with
// SIGKILL at a random instant (LIVETRAIN_KILL_ITERATIONS times each), or at each named crash point; then
// the store must open at exactly one committed generation whose content is what was saved, and every
// model file must hold the committed materialized generation, with no journal or temporary left. The same
// for generations written as parts by two processes (tensor-parallel ranks exchanging descriptors over
// pipes), either or both killed: never a generation with a missing or torn part.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <random>
#include <thread>

#include "checkpoint_helpers.hpp"
#include "checkpoint_shards.hpp"
#include "helpers.hpp"
#include "livetrain/checkpoint/hash.hpp"
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
  EXPECT_EQ(checkpoint::commit_read(checkpoint::default_store_dir(model)).head, 0u)
      << "an uncommitted delta is ignored";
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

namespace {

// A descriptor through a pipe, as one text line (the test's own wire format).
void send_part(int fd, const checkpoint::PartDescriptor& p) {
  char line[512];
  int n = std::snprintf(line, sizeof line, "%llu %llu %u %u %s %llu %s %llu %llu %llu\n",
                        (unsigned long long)p.generation, (unsigned long long)p.parent, p.part.rank, p.ranks,
                        p.part.file.c_str(), (unsigned long long)p.part.bytes.value_or(0),
                        checkpoint::hash_hex(p.part.hash).c_str(), (unsigned long long)p.part.changed,
                        (unsigned long long)p.elements, (unsigned long long)p.model_bytes);
  if (write(fd, line, static_cast<size_t>(n)) != n) _exit(4);
}

checkpoint::PartDescriptor receive_part(int fd) {
  std::string line;
  char c;
  while (read(fd, &c, 1) == 1 && c != '\n') line += c;
  if (line.empty()) _exit(5);  // the other rank died
  checkpoint::PartDescriptor p;
  char file[256], hash[32];
  unsigned long long g, parent, bytes, changed, elements, model_bytes;
  if (std::sscanf(line.c_str(), "%llu %llu %u %u %255s %llu %31s %llu %llu %llu", &g, &parent, &p.part.rank, &p.ranks,
                  file, &bytes, hash, &changed, &elements, &model_bytes) != 10) {
    _exit(6);
  }
  p.generation = g;
  p.parent = parent;
  p.part.file = file;
  p.part.bytes = bytes;
  p.part.hash = *checkpoint::hash_from_hex(hash);
  p.part.changed = changed;
  p.elements = elements;
  p.model_bytes = model_bytes;
  return p;
}

void signal_byte(int fd) {
  if (write(fd, "x", 1) != 1) _exit(4);
}
void wait_byte(int fd) {
  char c;
  if (read(fd, &c, 1) != 1) _exit(5);
}

checkpoint::Store open_rank(const std::string& model, uint32_t rank, const LiveModel& like) {
  checkpoint::OpenOptions o;
  o.rank = rank;
  o.ranks = 2;
  o.held = livetrain::testing::shard_of(like, rank, 2).held();
  return checkpoint::Store::open(model, "", o);
}

// Rank 0 and rank 1 of a TP 2 trainer, saving generation after generation in lockstep: rank 1 sends its
// part's descriptor to rank 0, which commits both and tells rank 1, which refreshes.
[[noreturn]] void rank0(const std::string& model, int to1, int from1) {
  Expected exp;
  checkpoint::Store s = open_rank(model, 0, exp.at(0));
  signal_byte(to1);  // rank 0 opened first (it recovers and cleans): rank 1 may open now
  for (;;) {
    const uint64_t g = s.commit().head + 1;
    auto shard = livetrain::testing::shard_of(exp.at(g), 0, 2);
    checkpoint::PartDescriptor mine = s.save_part(shard.live(true));
    checkpoint::PartDescriptor theirs = receive_part(from1);
    s.commit_parts({mine, theirs}, g);
    signal_byte(to1);
  }
}

[[noreturn]] void rank1(const std::string& model, int to0, int from0) {
  Expected exp;
  wait_byte(from0);
  checkpoint::Store s = open_rank(model, 1, exp.at(0));
  for (;;) {
    const uint64_t g = s.commit().head + 1;
    auto shard = livetrain::testing::shard_of(exp.at(g), 1, 2);
    send_part(to0, s.save_part(shard.live(true)));
    wait_byte(from0);
    s.refresh();
  }
}

// Starts both ranks; kills them after the delays (-1: let it die at its crash point, the other is then
// killed); returns once both are gone.
void run_ranks(const std::string& model, int delay0_us, int delay1_us, const char* crash_at = nullptr,
               int crash_rank = 0) {
  int a[2], b[2];  // a: rank 0 -> rank 1, b: rank 1 -> rank 0
  ASSERT_EQ(pipe(a), 0);
  ASSERT_EQ(pipe(b), 0);
  pid_t pids[2];
  for (int r = 0; r < 2; ++r) {
    pids[r] = fork();
    if (pids[r] == 0) {
      if (crash_at && r == crash_rank) setenv("LIVETRAIN_CHECKPOINT_CRASH_AT", crash_at, 1);
      try {
        if (r == 0) {
          close(a[0]);
          close(b[1]);
          rank0(model, a[1], b[0]);
        } else {
          close(a[1]);
          close(b[0]);
          rank1(model, b[1], a[0]);
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
        _exit(3);
      }
    }
  }
  for (int fd : {a[0], a[1], b[0], b[1]}) close(fd);
  const int delays[2] = {delay0_us, delay1_us};
  if (crash_at) {
    int status = 0;
    waitpid(pids[crash_rank], &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status)) << "rank " << crash_rank << " did not reach " << crash_at;
    kill(pids[1 - crash_rank], SIGKILL);
    waitpid(pids[1 - crash_rank], &status, 0);
    return;
  }
  const int first = delays[0] <= delays[1] ? 0 : 1;
  std::this_thread::sleep_for(std::chrono::microseconds(delays[first]));
  kill(pids[first], SIGKILL);
  std::this_thread::sleep_for(std::chrono::microseconds(delays[1 - first] - delays[first]));
  kill(pids[1 - first], SIGKILL);
  for (pid_t p : pids) {
    int status = 0;
    waitpid(p, &status, 0);
    // A rank whose partner died first may exit on its own (a closed pipe); a failure is exit code 3.
    EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << "a rank failed on its own";
  }
}

// Reopened (rank 0 at TP 1, which removes whatever is not committed): every generation complete.
void check_parts(const std::string& model, Expected& exp) {
  check(model, exp, exp.at(0));
  checkpoint::Store s = checkpoint::Store::open(model);
  EXPECT_TRUE(s.verify().empty()) << s.verify().front();
  for (const auto& g : s.commit().generations) {
    if (g.generation == s.commit().oldest) continue;
    EXPECT_EQ(g.parts.size(), g.ranks) << "generation " << g.generation;
  }
  for (const auto& e : std::filesystem::directory_iterator(s.dir())) {
    std::string n = e.path().filename().string();
    if (n.rfind("gen-", 0) != 0) continue;
    bool named = false;
    for (const auto& g : s.commit().generations) {
      for (const auto& p : g.parts) named = named || p.file == n;
    }
    EXPECT_TRUE(named) << "left behind: " << n;
  }
}

}  // namespace

TEST(CheckpointCrash, PartsOfTwoRanksKilledAtRandomInstants) {
  livetrain::testing::TempDir tmp;
  std::string model = tmp.file("model");
  Expected exp;
  livetrain::testing::write_model_dir(model, exp.at(0));
  { checkpoint::Store::create(model); }
  std::mt19937_64 rng(43);
  int n = iterations();
  for (int i = 0; i < n; ++i) {
    // Up to ~5 lockstep generations per run on 2 cores: kills land in every phase of the protocol.
    int d0 = static_cast<int>(40000 + rng() % 200000), d1 = static_cast<int>(40000 + rng() % 200000);
    run_ranks(model, d0, d1);
    check_parts(model, exp);
    if (HasFatalFailure()) return;
  }
  std::printf("[ measured ] %d runs of two ranks killed; store reached generation %llu\n", n,
              static_cast<unsigned long long>(checkpoint::commit_read(checkpoint::default_store_dir(model)).head));
}

TEST(CheckpointCrash, PartsKilledAtEachCrashPoint) {
  livetrain::testing::TempDir tmp;
  std::string model = tmp.file("model");
  Expected exp;
  livetrain::testing::write_model_dir(model, exp.at(0));
  { checkpoint::Store::create(model); }
  // Rank 1 dies once its part is durable (rank 0 waits for it forever); rank 0 dies with both parts
  // verified, before COMMIT; then once after its own part is written.
  for (auto [point, rank] :
       {std::pair{"part-written", 1}, std::pair{"parts-verified", 0}, std::pair{"part-written", 0}}) {
    const uint64_t before = checkpoint::commit_read(checkpoint::default_store_dir(model)).head;
    run_ranks(model, 0, 0, point, rank);
    check_parts(model, exp);
    EXPECT_EQ(checkpoint::commit_read(checkpoint::default_store_dir(model)).head, before)
        << point << " on rank " << rank;
  }
}
