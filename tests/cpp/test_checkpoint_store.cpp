// The checkpoint store: generations of sparse and dense bf16 changes restored bit-exactly, rollback after
// materializing a newer state, restore into a new directory, gc, symlink refusal, EFBIG mid-save, and
// clear errors (no partial write) for a wrong model, a missing or changed base, corrupt deltas, store
// files replaced by a device or a FIFO, an existing output directory, a create racing another process
// and the last generation number.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "checkpoint_helpers.hpp"
#include "helpers.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/tuning.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace checkpoint = livetrain::checkpoint;
namespace st = livetrain::safetensors;
using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
using livetrain::testing::expect_error;
using livetrain::testing::expect_state;
using livetrain::testing::LiveModel;
using livetrain::testing::TempDir;

namespace {

// Tests fork; the thread pool must not exist in the parent when they do.
const int kOneThread = setenv("LIVETRAIN_NUM_THREADS", "1", 1);

// The model directory's tensors, by name, as the safetensors reader sees them.
std::vector<std::vector<uint8_t>> read_dir(const std::string& dir, const LiveModel& like) {
  st::Model m = st::Model::open(dir);
  std::vector<std::vector<uint8_t>> out;
  for (const auto& name : like.names) {
    const auto& e = m.tensor(name);
    const uint8_t* p = e.file->data(*e.info);
    out.emplace_back(p, p + e.info->nbytes());
  }
  return out;
}

struct Fixture {
  TempDir tmp;
  std::string model = tmp.file("model");
  LiveModel live = livetrain::testing::make_live(1, 8);
  std::vector<LiveModel> states;  // states[g]
  Fixture() {
    livetrain::testing::write_model_dir(model, live);
    states.push_back(live);
  }
};

}  // namespace

TEST(CheckpointStore, GenerationsRoundTripBitExactly) {
  (void)kOneThread;
  Fixture f;
  checkpoint::Store s = checkpoint::Store::create(f.model);
  EXPECT_GE(s.commit().files.size(), 2u) << "the test model is sharded";
  const double fractions[] = {0.001, 0.2, 0.0, 0.01, 1.0, 0.0005};
  for (int g = 1; g <= 6; ++g) {
    livetrain::testing::perturb(f.live, 100 + g, fractions[g - 1]);
    checkpoint::SaveOptions o;
    o.weight_version = 10 * g;
    o.save_if_unchanged = true;
    checkpoint::SaveResult r = s.save(f.live.views(), o);
    EXPECT_TRUE(r.written);
    EXPECT_EQ(r.generation, static_cast<uint64_t>(g));
    f.states.push_back(f.live);
    std::printf("[ measured ] %.2f%% of elements changed: %llu delta bytes for a %llu-byte model\n",
                fractions[g - 1] * 100, static_cast<unsigned long long>(r.bytes),
                static_cast<unsigned long long>(r.model_bytes));
    if (g == 1 || g == 6) {
      EXPECT_LT(r.bytes * 20, r.model_bytes) << "a sparse change writes a small delta";
    }
  }
  // Unchanged weights write nothing unless asked.
  EXPECT_FALSE(s.save(f.live.views()).written);
  EXPECT_EQ(s.commit().generations[3].changed, 0u);
  EXPECT_EQ(s.commit().generations[2].weight_version, 20u);
  for (uint64_t g = 0; g <= 6; ++g) expect_state(s, g, f.states[g]);
  // Restore into live memory, backwards and forwards.
  for (uint64_t g : {2u, 0u, 5u, 6u}) {
    LiveModel scratch = livetrain::testing::make_live(99, 8);
    s.restore_live(g, scratch.views());
    EXPECT_EQ(scratch.data, f.states[g].data) << g;
    EXPECT_EQ(s.compare_live(g, scratch.views()).tensors, 0u);
    if (g != 6) {
      EXPECT_GT(s.compare_live(6, scratch.views()).elements, 0u);
    }
  }
  EXPECT_TRUE(s.verify().empty());
  // Reopened, the head is the last save.
  s.close();
  s = checkpoint::Store::open(f.model);
  EXPECT_EQ(s.commit().head, 6u);
  EXPECT_EQ(s.compare_live(6, f.live.views()).tensors, 0u);
  expect_state(s, 3, f.states[3]);
}

TEST(CheckpointStore, MaterializeRollbackRestoreDirAndGc) {
  Fixture f;
  checkpoint::Store s = checkpoint::Store::create(f.model);
  for (int g = 1; g <= 5; ++g) {
    livetrain::testing::perturb(f.live, g, g % 2 ? 0.01 : 0.3);
    s.save(f.live.views());
    f.states.push_back(f.live);
  }
  s.materialize(5);
  EXPECT_EQ(read_dir(f.model, f.live), f.states[5].data);
  EXPECT_FALSE(std::filesystem::exists(s.dir() + "/materialize.journal"));
  s.close();
  s = checkpoint::Store::open(f.model);  // the new hashes are committed
  EXPECT_EQ(s.commit().materialized, 5u);
  // Rollback from the materialized newer state to an older generation.
  s.materialize(2);
  EXPECT_EQ(read_dir(f.model, f.live), f.states[2].data);
  s.close();
  s = checkpoint::Store::open(f.model);
  for (uint64_t g = 0; g <= 5; ++g) expect_state(s, g, f.states[g]);
  // Restore into a new directory: same files, loadable, equal to the generation.
  s.restore_to_dir(3, f.tmp.file("out"));
  EXPECT_TRUE(std::filesystem::exists(f.tmp.file("out/model.safetensors.index.json")));
  EXPECT_EQ(read_dir(f.tmp.file("out"), f.live), f.states[3].data);
  // gc: generations before 4 are forgotten; the model files move to 4 first (they held 2).
  s.gc(4);
  EXPECT_EQ(s.commit().oldest, 4u);
  EXPECT_EQ(s.commit().materialized, 4u);
  EXPECT_FALSE(std::filesystem::exists(s.dir() + "/" + checkpoint::delta_file_name(4)));
  EXPECT_FALSE(std::filesystem::exists(s.dir() + "/" + checkpoint::delta_file_name(1)));
  EXPECT_TRUE(std::filesystem::exists(s.dir() + "/" + checkpoint::delta_file_name(5)));
  expect_error([&] { s.state(3); }, ErrorCode::kNotFound);
  s.close();
  s = checkpoint::Store::open(f.model);
  expect_state(s, 4, f.states[4]);
  expect_state(s, 5, f.states[5]);
  EXPECT_TRUE(s.verify().empty());
}

TEST(CheckpointStore, WrongModelAndBadLiveInputChangeNothing) {
  Fixture f;
  checkpoint::Store s = checkpoint::Store::create(f.model);
  std::string commit_before = livetrain::fs::read_file(s.dir() + "/COMMIT");
  LiveModel other = livetrain::testing::make_live(1, 3);  // same names, other shapes
  std::string msg = expect_error([&] { s.save(other.views()); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("model.embed_tokens.weight"), std::string::npos) << msg;
  auto views = f.live.views();
  views.push_back(views[0]);  // the same tensor twice
  msg = expect_error([&] { s.save(views); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("given twice"), std::string::npos) << msg;
  views = f.live.views();
  views.push_back(views[0]);
  views.back().name = "extra";
  msg = expect_error([&] { s.save(views); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("extra"), std::string::npos) << msg;
  EXPECT_EQ(livetrain::fs::read_file(s.dir() + "/COMMIT"), commit_before);
  expect_error([&] { s.state(7); }, ErrorCode::kNotFound);
  expect_error([&] { checkpoint::Store::open(f.model); }, ErrorCode::kBusy);
  expect_error([&] { checkpoint::Store::create(f.model); }, ErrorCode::kInvalidArg);
  expect_error([&] { checkpoint::Store::open(f.tmp.file("nothing")); }, ErrorCode::kNotFound);
}

TEST(CheckpointStore, MissingOrChangedBaseAndCorruptDeltas) {
  Fixture f;
  {
    checkpoint::Store s = checkpoint::Store::create(f.model);
    livetrain::testing::perturb(f.live, 3, 0.05);
    s.save(f.live.views());
  }
  std::string dir = checkpoint::default_store_dir(f.model);
  std::string shard = f.model + "/" + checkpoint::commit_read(dir).files[0].name;
  std::string delta = dir + "/" + checkpoint::delta_file_name(1);
  std::string orig = livetrain::testing::read_bytes(shard);
  // Hash mismatch: one byte of a model file changed behind the store's back.
  std::string changed = orig;
  changed[changed.size() - 1] ^= 1;
  livetrain::testing::write_bytes(shard, changed);
  std::string msg = expect_error([&] { checkpoint::Store::open(f.model); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find(shard), std::string::npos);
  EXPECT_NE(msg.find("does not match"), std::string::npos) << msg;
  // Missing base file.
  std::filesystem::remove(shard);
  msg = expect_error([&] { checkpoint::Store::open(f.model); }, ErrorCode::kNotFound);
  EXPECT_NE(msg.find(shard), std::string::npos) << msg;
  livetrain::testing::write_bytes(shard, orig);
  // Corrupt and truncated delta: named, and nothing written.
  std::string d = livetrain::testing::read_bytes(delta);
  std::string bad = d;
  bad[60] ^= 0x40;
  livetrain::testing::write_bytes(delta, bad);
  msg = expect_error([&] { checkpoint::Store::open(f.model); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find(delta), std::string::npos) << msg;
  livetrain::testing::write_bytes(delta, d.substr(0, d.size() / 2));
  msg = expect_error([&] { checkpoint::Store::open(f.model); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find(delta), std::string::npos) << msg;
  std::filesystem::remove(delta);
  msg = expect_error([&] { checkpoint::Store::open(f.model); }, ErrorCode::kNotFound);
  EXPECT_NE(msg.find(delta), std::string::npos) << msg;
  livetrain::testing::write_bytes(delta, d);
  EXPECT_EQ(livetrain::testing::read_bytes(shard), orig) << "no partial write";
  checkpoint::Store s = checkpoint::Store::open(f.model);
  EXPECT_EQ(s.compare_live(1, f.live.views()).tensors, 0u);
}

// A store file replaced by a device, a FIFO or a directory is refused naming it: a COMMIT symlinked to
// /dev/zero was read until memory ran out (an endless read; std::bad_alloc), a FIFO blocked the open forever.
TEST(CheckpointStore, AFileReplacedByADeviceOrFifoIsRefusedWithoutBlocking) {
  Fixture f;
  {
    checkpoint::Store s = checkpoint::Store::create(f.model);
    livetrain::testing::perturb(f.live, 3, 0.05);
    s.save(f.live.views());
  }
  const std::string dir = checkpoint::default_store_dir(f.model);
  const std::string commit = dir + "/COMMIT", delta = dir + "/" + checkpoint::delta_file_name(1);
  const std::string commit_bytes = livetrain::testing::read_bytes(commit),
                    delta_bytes = livetrain::testing::read_bytes(delta);
  auto refused = [&](const std::string& path) {
    // In a child, so that a blocked open fails the test instead of hanging it.
    pid_t pid = fork();
    if (pid == 0) {
      alarm(20);
      try {
        checkpoint::Store::open(f.model);
      } catch (const Error& e) {
        _exit(std::string(e.what()).find(path + ": not a regular file") != std::string::npos ? 0 : 2);
      } catch (...) {
        _exit(3);
      }
      _exit(4);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
  };
  for (const std::string& path : {commit, delta}) {
    std::filesystem::remove(path);
    std::filesystem::create_symlink("/dev/zero", path);
    EXPECT_EQ(refused(path), 0) << path << " -> /dev/zero";
    std::filesystem::remove(path);
    ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);
    EXPECT_EQ(refused(path), 0) << path << " a FIFO";  // SIGALRM (114) when the open blocks
    std::filesystem::remove(path);
    livetrain::testing::write_bytes(path, path == commit ? commit_bytes : delta_bytes);
  }
  checkpoint::Store s = checkpoint::Store::open(f.model);
  EXPECT_EQ(s.compare_live(1, f.live.views()).tensors, 0u);
}

// restore_to_dir writes a new directory only. Into the model's own directory it replaced the files the
// store names by the generation's (every later open then refused the store: "changed outside
// livetrain"); into another existing one it mixed its files with what was there.
TEST(CheckpointStore, RestoreToDirWritesANewDirectoryOnly) {
  Fixture f;
  checkpoint::Store s = checkpoint::Store::create(f.model);
  livetrain::testing::perturb(f.live, 4, 0.3);
  s.save(f.live.views());
  f.states.push_back(f.live);
  const std::string files_before = livetrain::testing::read_bytes(f.model + "/" + s.commit().files[0].name);
  ASSERT_EQ(mkdir(f.tmp.file("other").c_str(), 0755), 0);
  livetrain::testing::write_bytes(f.tmp.file("other/model.safetensors"), "another model's");
  for (const std::string& out : {f.model, f.model + "/", s.dir(), f.tmp.file("other")}) {
    std::string msg = expect_error([&] { s.restore_to_dir(1, out); }, ErrorCode::kInvalidArg);
    EXPECT_NE(msg.find(out + ": it already exists"), std::string::npos) << msg;
  }
  EXPECT_TRUE(livetrain::testing::read_bytes(f.model + "/" + s.commit().files[0].name) == files_before)
      << "a model file the store names was replaced";
  EXPECT_EQ(livetrain::testing::read_bytes(f.tmp.file("other/model.safetensors")), "another model's");
  // A parent that does not exist: the error names the generation and the directory asked for.
  std::string msg = expect_error([&] { s.restore_to_dir(1, f.tmp.file("no/such")); }, ErrorCode::kIo);
  EXPECT_NE(msg.find("writing generation 1 to " + f.tmp.file("no/such") + ": "), std::string::npos) << msg;
  s.restore_to_dir(1, f.tmp.file("new") + "/");
  EXPECT_EQ(read_dir(f.tmp.file("new"), f.live), f.states[1].data);
  ASSERT_EQ(mkdir(f.tmp.file("empty").c_str(), 0755), 0);  // as tempfile.mkdtemp makes one: taken
  s.restore_to_dir(1, f.tmp.file("empty"));
  EXPECT_EQ(read_dir(f.tmp.file("empty"), f.live), f.states[1].data);
  // A directory by the temporary's name already there (another writer's, a crashed run's) is not this call's:
  // the restore fails and leaves it as it was (it was removed with whatever it held).
  const std::string busy = f.tmp.file(".busy.livetrain-tmp." + std::to_string(::getpid()));
  ASSERT_EQ(mkdir(busy.c_str(), 0755), 0);
  livetrain::testing::write_bytes(busy + "/part", "another writer's");
  msg = expect_error([&] { s.restore_to_dir(1, f.tmp.file("busy")); }, ErrorCode::kIo);
  EXPECT_NE(msg.find("writing generation 1 to " + f.tmp.file("busy") + ": "), std::string::npos) << msg;
  EXPECT_EQ(livetrain::testing::read_bytes(busy + "/part"), "another writer's");
  std::filesystem::remove_all(busy);
  // Nothing but the directory is left beside it (the temporary it was filled under is gone).
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(f.tmp.path())) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"empty", "model", "new", "other"}));
  s.close();
  checkpoint::Store again = checkpoint::Store::open(f.model);  // the store still opens
  expect_state(again, 1, f.states[1]);
}

// Store::create writes COMMIT under the LOCK: while another process holds it (its own create, or a store
// it has open), create writes nothing. It wrote COMMIT first and then failed to lock, so two first saves at
// once could each write a COMMIT, the second replacing one the first had already moved to generation 1.
TEST(CheckpointStore, CreateWritesNothingWhileAnotherProcessHoldsTheLock) {
  Fixture f;
  const std::string dir = checkpoint::default_store_dir(f.model);
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t holder = fork();
  if (holder == 0) {
    int lock = ::open((dir + "/LOCK").c_str(), O_RDWR | O_CREAT, 0644);
    char c = flock(lock, LOCK_EX) == 0 ? 'y' : 'n';
    if (write(fds[1], &c, 1) != 1) _exit(1);
    pause();
    _exit(0);
  }
  char c = 0;
  ASSERT_EQ(read(fds[0], &c, 1), 1);
  ASSERT_EQ(c, 'y');
  std::string msg = expect_error([&] { checkpoint::Store::create(f.model); }, ErrorCode::kBusy);
  EXPECT_NE(msg.find("in use by another process"), std::string::npos) << msg;
  EXPECT_FALSE(std::filesystem::exists(dir + "/COMMIT"));
  kill(holder, SIGKILL);
  waitpid(holder, nullptr, 0);
  checkpoint::Store s = checkpoint::Store::create(f.model);
  EXPECT_EQ(s.commit().head, 0u);
}

// The largest generation number is the last: a save after it is refused, and the store still opens.
TEST(CheckpointStore, NoSaveAfterTheLargestGeneration) {
  Fixture f;
  std::string dir;
  {
    checkpoint::Store s = checkpoint::Store::create(f.model);
    dir = s.dir();
  }
  checkpoint::Commit c = checkpoint::commit_read(dir);
  c.head = c.oldest = c.materialized = c.generations[0].generation = checkpoint::kMaxGeneration;
  livetrain::fs::write_file_atomic(dir + "/COMMIT", checkpoint::commit_serialize(c));
  const std::string before = livetrain::fs::read_file(dir + "/COMMIT");
  checkpoint::Store s = checkpoint::Store::open(f.model);
  livetrain::testing::perturb(f.live, 5, 0.1);
  std::string msg = expect_error([&] { s.save(f.live.views()); }, ErrorCode::kOverflow);
  EXPECT_NE(msg.find("the largest there can be"), std::string::npos) << msg;
  EXPECT_EQ(livetrain::fs::read_file(dir + "/COMMIT"), before);
  s.close();
  EXPECT_EQ(checkpoint::Store::open(f.model).commit().head, checkpoint::kMaxGeneration);
}

// Opening removes the files of generations COMMIT does not name, and only those: with the store in a
// directory of the user's (--store DIR) it removed every file whose name began with "gen-".
TEST(CheckpointStore, OpenRemovesOnlyTheStoresOwnUncommittedFiles) {
  Fixture f;
  const std::string dir = f.tmp.file("mine");
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  const std::vector<std::string> users = {"gen-notes.txt", "generated.csv", "gen-1.delta",
                                          "gen-00000000000000000001.delta.bak",
                                          "gen-00000000000000000001.rank-1.delta"};
  const std::vector<std::string> uncommitted = {checkpoint::delta_file_name(7), checkpoint::part_file_name(7, 1, 2),
                                                checkpoint::optimizer_file_name(checkpoint::delta_file_name(7)),
                                                "." + checkpoint::delta_file_name(7) + ".livetrain-tmp.1.0"};
  for (const auto& name : users) livetrain::testing::write_bytes(dir + "/" + name, "mine");
  for (const auto& name : uncommitted) livetrain::testing::write_bytes(dir + "/" + name, "left by a crash");
  checkpoint::Store s = checkpoint::Store::create(f.model, dir);
  for (const auto& name : users) EXPECT_TRUE(std::filesystem::exists(dir + "/" + name)) << name << " was removed";
  for (const auto& name : uncommitted) EXPECT_FALSE(std::filesystem::exists(dir + "/" + name)) << name << " was kept";
}

// A COMMIT edited to name another file as a generation's delta or optimizer state (COMMIT itself, the
// LOCK, a model file, a user's file beside the store, another generation's state): gc deleted it (COMMIT
// too: the store was gone). Now refused at open naming the field, nothing removed.
TEST(CheckpointStore, ACommitNamingAnotherFileIsRefusedAndNothingIsRemoved) {
  Fixture f;
  const std::string optim = f.tmp.file("optim.bin");
  livetrain::testing::write_bytes(optim, std::string(1000, 'o'));
  const std::string dir = f.tmp.file("store");
  {
    checkpoint::Store s = checkpoint::Store::create(f.model, dir);
    checkpoint::SaveOptions o;
    o.optimizer_state = optim;
    for (int g = 1; g <= 3; ++g) {
      livetrain::testing::perturb(f.live, g, 0.1);
      s.save(f.live.views(), o);
    }
  }
  livetrain::testing::write_bytes(dir + "/notes.txt", "mine");
  const std::string good = livetrain::fs::read_file(dir + "/COMMIT");
  const std::string model_file = std::filesystem::directory_iterator(f.model)->path().filename().string();
  const std::string optim1 = checkpoint::optimizer_file_name(checkpoint::delta_file_name(1));
  const std::string delta1 = checkpoint::delta_file_name(1);
  for (const std::string& what : {optim1, delta1}) {
    for (const std::string& name :
         {std::string("COMMIT"), std::string("LOCK"), model_file, std::string("notes.txt"),
          checkpoint::optimizer_file_name(checkpoint::delta_file_name(3)), checkpoint::delta_file_name(2)}) {
      std::string bad = good;
      bad.replace(bad.find("\"" + what + "\""), what.size() + 2, "\"" + name + "\"");
      livetrain::fs::write_file_atomic(dir + "/COMMIT", bad);
      std::string msg = expect_error(
          [&] {
            checkpoint::Store s = checkpoint::Store::open(f.model, dir);
            s.gc(2);
          },
          ErrorCode::kFormat);
      EXPECT_NE(msg.find("generations[1].parts[0]"), std::string::npos) << msg;
      EXPECT_NE(msg.find("\"" + name + "\" is not the name the store gives"), std::string::npos) << msg;
      EXPECT_EQ(livetrain::fs::read_file(dir + "/COMMIT"), bad) << name;
      EXPECT_TRUE(std::filesystem::exists(dir + "/notes.txt"));
      EXPECT_TRUE(std::filesystem::exists(dir + "/LOCK"));
      EXPECT_TRUE(std::filesystem::exists(f.model + "/" + model_file));
    }
  }
  livetrain::fs::write_file_atomic(dir + "/COMMIT", good);
  // The untouched COMMIT: gc removes generation 1's files only, and keeps generation 2's optimizer state with
  // the new base (a base part without a delta; COMMIT with one was refused at the next open before).
  {
    checkpoint::Store s = checkpoint::Store::open(f.model, dir);
    s.gc(2);
  }
  checkpoint::Store s = checkpoint::Store::open(f.model, dir);
  EXPECT_EQ(s.commit().oldest, 2u);
  ASSERT_EQ(s.commit().generations[0].parts.size(), 1u);
  EXPECT_EQ(s.commit().generations[0].parts[0].file, "");
  EXPECT_EQ(s.commit().generations[0].parts[0].optimizer_state,
            checkpoint::optimizer_file_name(checkpoint::delta_file_name(2)));
  EXPECT_TRUE(s.verify().empty());
  EXPECT_FALSE(std::filesystem::exists(dir + "/" + optim1));
  EXPECT_FALSE(std::filesystem::exists(dir + "/" + delta1));
  EXPECT_TRUE(std::filesystem::exists(dir + "/" + checkpoint::optimizer_file_name(checkpoint::delta_file_name(2))));
  EXPECT_TRUE(std::filesystem::exists(dir + "/notes.txt"));
  expect_state(s, 3, f.live);
}

TEST(CheckpointStore, SymlinkedModelFilesAreNeverWrittenThrough) {
  Fixture f;
  // A Hugging Face-style snapshot: the model file is a link to a blob.
  std::string blobs = f.tmp.file("blobs");
  std::filesystem::create_directory(blobs);
  std::string name;
  for (const auto& e : std::filesystem::directory_iterator(f.model)) {
    if (e.path().filename().string().rfind("model-00001-of-", 0) == 0) name = e.path().filename().string();
  }
  std::filesystem::rename(f.model + "/" + name, blobs + "/abc123");
  std::filesystem::create_symlink(blobs + "/abc123", f.model + "/" + name);
  std::string blob = livetrain::testing::read_bytes(blobs + "/abc123");
  checkpoint::Store s = checkpoint::Store::create(f.model);
  livetrain::testing::perturb(f.live, 5, 1.0);
  s.save(f.live.views());
  std::string msg = expect_error([&] { s.materialize(1); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find(name), std::string::npos) << msg;
  EXPECT_NE(msg.find("--copy-symlinks"), std::string::npos) << msg;
  EXPECT_EQ(livetrain::testing::read_bytes(blobs + "/abc123"), blob);
  s.materialize(1, /*copy_symlinks=*/true);
  EXPECT_FALSE(std::filesystem::is_symlink(f.model + "/" + name));
  EXPECT_EQ(livetrain::testing::read_bytes(blobs + "/abc123"), blob) << "the blob is untouched";
  EXPECT_EQ(read_dir(f.model, f.live), f.live.data);
}

// The same for a hard link (a model directory copied with `cp -al`): materialize wrote through it, changing
// the original directory's file as well.
TEST(CheckpointStore, HardLinkedModelFilesAreNeverWrittenThrough) {
  Fixture f;
  std::string name;
  for (const auto& e : std::filesystem::directory_iterator(f.model)) {
    if (e.path().filename().string().rfind("model-00001-of-", 0) == 0) name = e.path().filename().string();
  }
  const std::string original = f.tmp.file("original");
  std::filesystem::create_hard_link(f.model + "/" + name, original);
  const std::string bytes = livetrain::testing::read_bytes(original);
  checkpoint::Store s = checkpoint::Store::create(f.model);
  livetrain::testing::perturb(f.live, 5, 1.0);
  s.save(f.live.views());
  std::string msg = expect_error([&] { s.materialize(1); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find(name + " has 2 hard links"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--copy-symlinks"), std::string::npos) << msg;
  EXPECT_TRUE(livetrain::testing::read_bytes(original) == bytes) << "the other name's file changed";
  s.materialize(1, /*copy_symlinks=*/true);
  EXPECT_EQ(std::filesystem::hard_link_count(f.model + "/" + name), 1u);
  EXPECT_TRUE(livetrain::testing::read_bytes(original) == bytes) << "the other name's file changed";
  EXPECT_EQ(read_dir(f.model, f.live), f.live.data);
}

// A full disk mid-save (RLIMIT_FSIZE → EFBIG, as in test04): a clear error, the previous generation intact.
TEST(CheckpointStore, FileTooLargeDuringSaveKeepsThePreviousGeneration) {
  Fixture f;
  { checkpoint::Store s = checkpoint::Store::create(f.model); }
  LiveModel next = f.live;
  livetrain::testing::perturb(next, 9, 1.0);
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGXFSZ, SIG_IGN);
    checkpoint::Store s = checkpoint::Store::open(f.model);
    rlimit lim{4096, 4096};
    setrlimit(RLIMIT_FSIZE, &lim);
    try {
      s.save(next.views());
    } catch (const Error& e) {
      std::string m = e.what();
      _exit(m.find("File too large") != std::string::npos && m.find("gen-") != std::string::npos ? 0 : 2);
    }
    _exit(1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  checkpoint::Store s = checkpoint::Store::open(f.model);
  EXPECT_EQ(s.commit().head, 0u);
  EXPECT_EQ(s.compare_live(0, f.live.views()).tensors, 0u);
  for (const auto& e : std::filesystem::directory_iterator(s.dir())) {
    std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "COMMIT" || n == "LOCK") << "left behind: " << n;
  }
}

// The writer's knobs write the same bytes: checkpoint.writeback_mib starts the delta's disk writes while it is
// still being written (fs::Writer's set_writeback; 1 MiB, its smallest step, at least once per delta here:
// dense changes of a 12 MiB embedding); checkpoint.early_writer writes the delta on its own thread from the
// first encoded record on, the header (its record count) last, hashing behind the header of a guessed count
// (every tensor: right after a dense step, wrong after one tensor changed); checkpoint.encoder >= 2 leaves the
// records' checksums to the writer (3 also measures the gap sizes only where they could win, 4 writes them per
// block on the pool's threads). Every
// combination writes the files of the encoder before with the writer after the diff and no early writeback
// (encoder 0, early_writer 0, writeback_mib 0), for dense, sparse and no changes (no file then, nor a
// temporary one left; with save_if_unchanged a file of no record), and they verify.
TEST(CheckpointStore, EveryEncoderAndWriterWritesTheSameBytes) {
  struct Reset {
    ~Reset() { livetrain::tuning::reset(); }
  } reset;
  TempDir tmp;
  const std::string model = tmp.file("model");
  LiveModel live = livetrain::testing::make_live(3, 1000);
  livetrain::testing::write_model_dir(model, live);
  struct Setting {
    int encoder, early, writeback_mib;
  };
  const Setting settings[] = {{0, 0, 0}, {3, 0, 16}, {2, 0, 16}, {3, 0, 1},  {3, 1, 1},
                              {2, 1, 1}, {0, 1, 0},  {1, 1, 16}, {4, 0, 16}, {4, 1, 1}};
  std::vector<checkpoint::Store> stores;
  for (size_t k = 0; k < std::size(settings); ++k) {
    stores.push_back(checkpoint::Store::create(model, tmp.file("store-" + std::to_string(k))));
  }
  auto save_all = [&](const checkpoint::SaveOptions& options, const std::string& what) -> checkpoint::SaveResult {
    std::vector<checkpoint::SaveResult> r;
    for (size_t k = 0; k < stores.size(); ++k) {
      livetrain::tuning::set("checkpoint.encoder", settings[k].encoder);
      livetrain::tuning::set("checkpoint.early_writer", settings[k].early);
      livetrain::tuning::set("checkpoint.writeback_mib", settings[k].writeback_mib);
      r.push_back(stores[k].save(live.views(), options));
    }
    livetrain::tuning::reset();
    for (size_t k = 1; k < stores.size(); ++k) {
      SCOPED_TRACE(what + ", encoder " + std::to_string(settings[k].encoder) + ", early_writer " +
                   std::to_string(settings[k].early) + ", writeback_mib " + std::to_string(settings[k].writeback_mib));
      EXPECT_EQ(r[k].written, r[0].written);
      EXPECT_EQ(r[k].generation, r[0].generation);
      EXPECT_EQ(r[k].bytes, r[0].bytes);
      if (!r[0].written || !r[k].written || r[k].generation != r[0].generation) continue;
      const std::string name = checkpoint::delta_file_name(r[0].generation);
      EXPECT_EQ(livetrain::fs::read_file(stores[0].dir() + "/" + name),
                livetrain::fs::read_file(stores[k].dir() + "/" + name));
    }
    return r[0];
  };
  const double fractions[] = {1.0, 0.01, 0.0, 0.3};
  for (int step = 0; step < 4; ++step) {
    livetrain::testing::perturb(live, 400 + step, fractions[step]);
    const checkpoint::SaveResult r = save_all({}, "step " + std::to_string(step));
    EXPECT_EQ(r.written, fractions[step] > 0) << "step " << step;
    if (step == 0) {
      EXPECT_GT(r.bytes, uint64_t{1} << 20) << "the dense delta must span several writeback steps";
    }
  }
  // One tensor of four changed: a record count below the early writer's guess (every tensor).
  livetrain::testing::perturb(live, 404, 0.0);
  live.data[1][6] ^= 1;
  EXPECT_TRUE(save_all({}, "one tensor changed").written);
  checkpoint::SaveOptions always;
  always.save_if_unchanged = true;
  const checkpoint::SaveResult r = save_all(always, "no change, save_if_unchanged");
  EXPECT_TRUE(r.written);
  EXPECT_EQ(r.changed, 0u);
  for (checkpoint::Store& s : stores) {
    EXPECT_TRUE(s.verify().empty());
    EXPECT_EQ(s.compare_live(s.commit().head, live.views()).elements, 0u);
    for (const auto& e : std::filesystem::directory_iterator(s.dir())) {
      EXPECT_EQ(e.path().filename().string().find(".livetrain-tmp."), std::string::npos) << "left behind: " << e.path();
    }
  }
}

#ifdef LIVETRAIN_WITH_CUDA
// A save from GPU weights writes the same delta file as a save of the same bytes from host memory, under
// every tuning of the GPU save (the pipeline, the one-pass diff, digests, small groups), for sparse,
// dense (values outgrow the reserved buffer) and no changes; the head copy stays right across them.
TEST(CheckpointStoreCuda, EveryTuningWritesTheCpuSavesBytes) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  livetrain::testing::for_each_gpu_save_tuning([&] {
    TempDir tmp;
    const std::string model = tmp.file("model");
    LiveModel live = livetrain::testing::make_live(3, 200);  // a 2.4 MiB embedding: several 1 MiB groups
    livetrain::testing::write_model_dir(model, live);
    checkpoint::Store host = checkpoint::Store::create(model, tmp.file("store-host"));
    checkpoint::Store gpu = checkpoint::Store::create(model, tmp.file("store-gpu"));
    std::vector<void*> dev(live.names.size());
    for (size_t i = 0; i < dev.size(); ++i) ASSERT_EQ(cudaMalloc(&dev[i], live.data[i].size()), cudaSuccess);
    auto device_views = [&] {
      std::vector<checkpoint::LiveTensor> v = live.views();
      for (size_t i = 0; i < v.size(); ++i) {
        EXPECT_EQ(cudaMemcpy(dev[i], live.data[i].data(), live.data[i].size(), cudaMemcpyHostToDevice), cudaSuccess);
        v[i].data = dev[i];
        v[i].device = 0;
      }
      return v;
    };
    const double fractions[] = {0.01, 0.0, 1.0, 0.2, 0.0};
    for (int step = 0; step < 5; ++step) {
      livetrain::testing::perturb(live, 200 + step, fractions[step]);
      const checkpoint::SaveResult a = host.save(live.views());
      const checkpoint::SaveResult b = gpu.save(device_views());
      ASSERT_EQ(a.written, b.written) << "step " << step;
      EXPECT_EQ(a.changed, b.changed) << "step " << step;
      if (!a.written) continue;
      const std::string name = checkpoint::delta_file_name(a.generation);
      EXPECT_EQ(livetrain::fs::read_file(tmp.file("store-host/" + name)),
                livetrain::fs::read_file(tmp.file("store-gpu/" + name)))
          << "step " << step;
    }
    EXPECT_EQ(gpu.compare_live(gpu.commit().head, live.views()).elements, 0u);
    EXPECT_TRUE(gpu.verify().empty());
    for (void* p : dev) cudaFree(p);
  });
}
#endif

// prepare_gpu page-locks the head copy on a thread of its own (where there is a CUDA device; here, without
// one, that thread fails and the failure is left to a GPU save). Either way the store works on: host saves
// write the bytes of a store that never called it, a move of the store and close wait for the thread, a
// second call is a no-op, and a device below 0 is refused.
TEST(CheckpointStore, PrepareGpuLeavesSavesAsTheyWere) {
  TempDir tmp;
  const std::string model = tmp.file("model");
  LiveModel live = livetrain::testing::make_live(5, 100);
  livetrain::testing::write_model_dir(model, live);
  checkpoint::Store plain = checkpoint::Store::create(model, tmp.file("plain"));
  checkpoint::Store prepared = checkpoint::Store::create(model, tmp.file("prepared"));
  prepared.prepare_gpu(0);
  prepared.prepare_gpu(0);
  EXPECT_THROW(prepared.prepare_gpu(-1), Error);
  checkpoint::Store moved = std::move(prepared);
  // Polled, it ends, however its thread does (here it fails at once without a CUDA device), also after a move:
  // gpu_prepared reads the flag the thread clears on every way out, not the future a save may be waiting on.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!moved.gpu_prepared() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_TRUE(moved.gpu_prepared());
  for (int step = 0; step < 2; ++step) {
    livetrain::testing::perturb(live, 500 + step, 0.1);
    const checkpoint::SaveResult a = plain.save(live.views()), b = moved.save(live.views());
    ASSERT_TRUE(a.written && b.written);
    EXPECT_EQ(a.generation, b.generation);
    const std::string name = checkpoint::delta_file_name(a.generation);
    EXPECT_EQ(livetrain::fs::read_file(plain.dir() + "/" + name), livetrain::fs::read_file(moved.dir() + "/" + name));
  }
  plain.close();
  checkpoint::Store fresh = checkpoint::Store::open(model, tmp.file("plain"));
  EXPECT_TRUE(fresh.gpu_prepared());  // nothing started
  fresh.prepare_gpu(0);
  fresh.close();  // waits for the thread
  EXPECT_TRUE(fresh.gpu_prepared());
}
