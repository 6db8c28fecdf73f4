// Sharing between real processes: shm export/attach across fork with in-place updates seen by both sides,
// owner liveness (dead pid, reused pid, other boot) and identity (another user, a process that does not
// map the segment), the single-trainer lease keyed on the memory, and CUDA paths failing cleanly on
// machines without a GPU.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>

#include "helpers.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/sharing.hpp"

using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
namespace sh = livetrain::sharing;

namespace {

// Runs `body` in a forked child; returns its exit status and whatever it wrote to `msg` (via a pipe).
// The child never returns into GoogleTest: it _exits with body's result.
template <typename F>
std::pair<int, std::string> in_child(F body) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe");
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::string msg;
    int rc = 99;
    try {
      rc = body(msg);
    } catch (const std::exception& e) {
      msg = std::string("exception: ") + e.what();
      rc = 98;
    }
    (void)!::write(fds[1], msg.data(), msg.size());
    ::_exit(rc);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// The pid of a process that has exited and been reaped.
uint64_t dead_pid() {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int status;
  ::waitpid(pid, &status, 0);
  return static_cast<uint64_t>(pid);
}

sh::ModelDesc tiny_model() {
  sh::ModelDesc m;
  m.path = "/models/tiny";
  m.engine = "test";
  m.config = livetrain::json::parse(R"({"model_type":"llama"})");
  return m;
}

// An engine export with one shm segment holding a [4, 3] F32 tensor (values 0..11) and its transpose view.
struct Engine {
  sh::Export exp;
  float* data = nullptr;
  Engine() {
    uint32_t b = exp.add_shm(4096);
    data = reinterpret_cast<float*>(exp.shm(b).data());
    for (int i = 0; i < 12; ++i) data[i] = static_cast<float>(i);
    exp.add_tensor(sh::TensorDesc{"w", DType::kF32, {4, 3}, {3, 1}, b, 0});
    exp.add_tensor(sh::TensorDesc{"w.T", DType::kF32, {3, 4}, {1, 3}, b, 0});
    exp.add_tensor(sh::TensorDesc{"bias", DType::kBF16, {7}, {1}, b, 64});
  }
};

// An Engine whose manifest is written at `manifest` in a temporary directory.
struct Exported {
  livetrain::testing::TempDir dir;
  std::string manifest = dir.file("m.json");
  Engine engine;
  Exported() { engine.exp.write_manifest(manifest, tiny_model()); }
};

// Runs `f` in a child process: 0 when it throws livetrain::Error with `code`, 1 when it returns, 2 on another
// error; and the error's message.
template <typename F>
std::pair<int, std::string> refused_in_child(ErrorCode code, F f) {
  return in_child([&](std::string& out) {
    try {
      f();
      out = "not refused";
      return 1;
    } catch (const Error& e) {
      out = e.what();
      return e.code() == code ? 0 : 2;
    }
  });
}

bool has_text(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

}  // namespace

TEST(Owner, CurrentProcessIsAlive) {
  sh::OwnerDesc me = sh::current_owner();
  EXPECT_EQ(me.pid, static_cast<uint64_t>(::getpid()));
  EXPECT_GT(me.start_time, 0u);
  EXPECT_EQ(me.boot_id.size(), 36u);
  EXPECT_EQ(sh::owner_state(me), sh::OwnerState::kAlive);
  EXPECT_NO_THROW(sh::owner_check(me, "m.json"));
}

TEST(Owner, DeadPidIsStale) {
  sh::OwnerDesc o = sh::current_owner();
  o.pid = dead_pid();
  EXPECT_EQ(sh::owner_state(o), sh::OwnerState::kDead);
  try {
    sh::owner_check(o, "m.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kStale);
    EXPECT_TRUE(has_text(e.what(), "stale manifest m.json")) << e.what();
    EXPECT_TRUE(has_text(e.what(), "pid " + std::to_string(o.pid) + ", is not running")) << e.what();
  }
}

TEST(Owner, ReusedPidIsStale) {
  sh::OwnerDesc o = sh::current_owner();
  o.start_time += 1;  // same pid, another process
  std::string detail;
  EXPECT_EQ(sh::owner_state(o, &detail), sh::OwnerState::kPidReused);
  EXPECT_TRUE(has_text(detail, "another process")) << detail;
}

TEST(Owner, WrongBootIdIsStale) {
  sh::OwnerDesc o = sh::current_owner();
  o.boot_id = "00000000-0000-0000-0000-000000000000";
  std::string detail;
  EXPECT_EQ(sh::owner_state(o, &detail), sh::OwnerState::kOtherBoot);
  EXPECT_TRUE(has_text(detail, "before the last reboot")) << detail;
  EXPECT_THROW(sh::owner_check(o, "m.json"), Error);
}

TEST(Owner, StartTimeParsesOddProcessNames) {
  // comm may hold spaces and ')': field 22 must be counted from the last ')'.
  auto [rc, msg] = in_child([](std::string& out) {
    ::prctl(PR_SET_NAME, "a) b (c) d", 0, 0, 0);
    out = std::to_string(sh::process_start_time(static_cast<uint64_t>(::getpid())).value_or(0));
    return 0;
  });
  ASSERT_EQ(rc, 0) << msg;
  uint64_t mine = *sh::process_start_time(static_cast<uint64_t>(::getpid()));
  EXPECT_GE(std::stoull(msg), mine);  // the child started after us
  EXPECT_FALSE(sh::process_start_time(dead_pid()).has_value());
}

TEST(Lease, SecondTrainerIsRefusedWithTheHolderPid) {
  Exported x;
  const std::string& manifest = x.manifest;
  sh::Manifest m = sh::manifest_read(manifest);
  sh::Lease lease = sh::Lease::acquire(m, manifest);
  ASSERT_TRUE(lease.held());
  EXPECT_EQ(lease.object(), x.engine.exp.shm(0).name());  // keyed on the segment itself
  EXPECT_EQ(sh::lease_holder(manifest), static_cast<uint64_t>(::getpid()));
  auto [rc, msg] = refused_in_child(ErrorCode::kBusy, [&] { sh::Lease::acquire(m, manifest); });
  EXPECT_EQ(rc, 0) << msg;
  EXPECT_TRUE(has_text(msg, "(pid " + std::to_string(::getpid()) + ",")) << msg;
  lease.release();
  EXPECT_FALSE(sh::lease_holder(manifest).has_value());
  auto [rc2, msg2] = in_child([&](std::string&) { return sh::Lease::acquire(m, manifest).held() ? 0 : 1; });
  EXPECT_EQ(rc2, 0) << msg2;
}

TEST(Lease, HolderThatDiesReleasesIt) {
  Exported x;
  const std::string& manifest = x.manifest;
  sh::Manifest m = sh::manifest_read(manifest);
  // The child takes the lease and exits without releasing it (as a crash would).
  auto [rc, msg] = in_child([&](std::string&) {
    static sh::Lease leaked;
    leaked = sh::Lease::acquire(m, manifest);
    ::_exit(0);
    return 0;
  });
  EXPECT_EQ(rc, 0) << msg;
  EXPECT_NO_THROW(sh::Lease::acquire(m, manifest));
}

TEST(Lease, CudaLeaseIsAnObjectNamedAfterTheHandle) {
  // No GPU needed: the lease of a CUDA manifest is a lock object named after its first IPC handle, made
  // by the first trainer and removed by the last one that held it.
  livetrain::testing::TempDir dir;
  std::string manifest = dir.file("m.json");
  sh::Manifest m;
  m.owner = sh::current_owner();
  m.model = tiny_model();
  m.buffers.push_back(sh::BufferDesc{sh::BufferKind::kCudaIpc, "", std::string(127, 'a') + "1",
                                     "GPU-01234567-89ab-cdef-0123-456789abcdef", 4096});
  std::string object = sh::lease_object(m);
  EXPECT_EQ(object.rfind("/livetrain-lease-", 0), 0u) << object;
  sh::Manifest other = m;
  other.buffers[0].ipc_handle = std::string(127, 'a') + "2";
  EXPECT_NE(sh::lease_object(other), object);
  {
    sh::Lease lease = sh::Lease::acquire(m, manifest);
    auto [rc, msg] = refused_in_child(ErrorCode::kBusy, [&] { sh::Lease::acquire(m, dir.file("copy.json")); });
    EXPECT_EQ(rc, 0) << msg;
  }
  EXPECT_FALSE(std::filesystem::exists("/dev/shm" + object));  // removed with the lease
  EXPECT_NO_THROW(sh::Lease::acquire(m, manifest));
}

TEST(Shm, ExportAttachAcrossProcessesSharesMemory) {
  Exported x;
  const std::string& manifest = x.manifest;
  Engine& engine = x.engine;

  // The trainer: attaches, checks what the engine wrote, updates in place.
  auto [rc, msg] = in_child([&](std::string& out) {
    auto a = sh::Attachment::open(manifest);
    if (!a->lease_held()) return 1;
    const sh::TensorView& w = a->view("w");
    const sh::TensorView& wt = a->view("w.T");
    if (w.device != -1 || w.desc->shape != std::vector<uint64_t>{4, 3}) return 2;
    auto* p = static_cast<float*>(w.data);
    for (int i = 0; i < 12; ++i) {
      if (p[i] != static_cast<float>(i)) return 3;
    }
    // The transposed view reads element [c][r] of w at c*1 + r*3.
    if (static_cast<float*>(wt.data)[2 * 1 + 3 * 3] != p[3 * 3 + 2]) return 4;
    for (int i = 0; i < 12; ++i) p[i] = -p[i] - 100.0f;
    out = "ok";
    return 0;
  });
  ASSERT_EQ(rc, 0) << msg;
  for (int i = 0; i < 12; ++i) EXPECT_EQ(engine.data[i], -static_cast<float>(i) - 100.0f) << i;

  // And an engine-side change is seen by a new trainer (the lease was released when the child exited).
  engine.data[5] = 42.0f;
  auto [rc2, msg2] = in_child([&](std::string&) {
    auto a = sh::Attachment::open(manifest);
    return static_cast<float*>(a->view("w").data)[5] == 42.0f ? 0 : 1;
  });
  EXPECT_EQ(rc2, 0) << msg2;
}

// Attaches to `manifest` in a child process: 0 when that is refused as busy (the lease is held), 1 when
// it attaches, 2 on another error; and the error's message.
static std::pair<int, std::string> attach_in_child_expecting_busy(const std::string& manifest) {
  return refused_in_child(ErrorCode::kBusy, [&] { sh::Attachment::open(manifest); });
}

TEST(Shm, SecondTrainerIsRefusedWhileTheFirstIsAttached) {
  Exported x;
  const std::string& manifest = x.manifest;
  auto first = sh::Attachment::open(manifest);
  auto [rc, msg] = attach_in_child_expecting_busy(manifest);
  EXPECT_EQ(rc, 0) << msg;
  EXPECT_TRUE(has_text(msg, "another trainer holds the lease")) << msg;
  // Inspection without the lease is still possible.
  auto reader = sh::Attachment::open(manifest, sh::AttachOptions{true, false, std::nullopt});
  EXPECT_EQ(static_cast<float*>(reader->view("w").data)[1], 1.0f);
}

TEST(Shm, CopiedManifestDoesNotBypassTheLease) {
  // Regression test for issue #13: a byte-identical copy of the manifest at another path had a lease
  // file of its own, and let a second trainer write the same weights.
  Exported x;
  const std::string& manifest = x.manifest;
  std::string copy = x.dir.file("elsewhere.json");
  livetrain::fs::write_file_atomic(copy, livetrain::fs::read_file(manifest));
  auto first = sh::Attachment::open(manifest);
  auto [rc, msg] = attach_in_child_expecting_busy(copy);
  EXPECT_EQ(rc, 0) << msg;
  EXPECT_TRUE(has_text(msg, "(pid " + std::to_string(::getpid()) + ",")) << msg;
}

TEST(Shm, ManifestWhoseOwnerDoesNotMapTheSegmentIsRefused) {
  // Regression test for issue #13: liveness accepted any live pid. Here the named owner (this process)
  // is alive but never mapped the segment: a forged manifest pointing at someone's memory.
  livetrain::testing::TempDir dir;
  std::string manifest = dir.file("m.json");
  std::string name = "/livetrain-test-" + std::to_string(::getpid()) + "-forged";
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 4096), 0);
  ::close(fd);
  sh::Manifest m;
  m.owner = sh::current_owner();
  m.model = tiny_model();
  m.buffers.push_back(sh::BufferDesc{sh::BufferKind::kShm, name, "", "", 4096});
  m.tensors.push_back(sh::TensorDesc{"w", DType::kF32, {4}, {1}, 0, 0});
  sh::manifest_write(manifest, m);
  auto [rc, msg] = refused_in_child(ErrorCode::kStale, [&] { sh::Attachment::open(manifest); });
  ::shm_unlink(name.c_str());
  EXPECT_EQ(rc, 0) << msg;
  EXPECT_TRUE(has_text(msg, "does not map shared memory " + name)) << msg;
}

TEST(Shm, AnotherUsersEngineOrSegmentIsRefused) {
  // Regression test for issue #13: a segment owned by another user was attached read-write.
  Exported x;
  const std::string& manifest = x.manifest;
  uint32_t other = static_cast<uint32_t>(::getuid()) + 1;
  sh::AttachOptions expect_other;
  expect_other.owner_uid = other;
  try {
    sh::Attachment::open(manifest, expect_other);  // the engine (this process) runs as another uid than expected
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kStale);
    EXPECT_TRUE(has_text(e.what(), "runs as uid " + std::to_string(::getuid()))) << e.what();
  }
  expect_other.check_owner = false;  // without the owner checks, the segment's own uid is still checked
  try {
    sh::Attachment::open(manifest, expect_other);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(has_text(e.what(), "belongs to uid " + std::to_string(::getuid()))) << e.what();
  }
  if (::geteuid() != 0) GTEST_SKIP() << "chown of a segment to another user needs root";
  std::string path = "/dev/shm" + x.engine.exp.shm(0).name();
  ASSERT_EQ(::chown(path.c_str(), 65534, 65534), 0);
  try {
    sh::Attachment::open(manifest);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(has_text(e.what(), "belongs to uid 65534")) << e.what();
  }
}

TEST(Shm, DeadOwnerIsRefusedBeforeMapping) {
  livetrain::testing::TempDir dir;
  std::string manifest = dir.file("m.json");
  Engine engine;
  sh::Manifest m = engine.exp.manifest(tiny_model());
  m.owner.pid = dead_pid();
  sh::manifest_write(manifest, m);
  try {
    sh::Attachment::open(manifest);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kStale);
    EXPECT_TRUE(has_text(e.what(), "stale manifest")) << e.what();
  }
  EXPECT_FALSE(sh::lease_holder(manifest).has_value());  // refused before taking the lease
}

TEST(Shm, SegmentIsUnlinkedWithTheExport) {
  livetrain::testing::TempDir dir;
  std::string manifest = dir.file("m.json");
  std::string name;
  {
    Engine engine;
    name = engine.exp.shm(0).name();
    engine.exp.write_manifest(manifest, tiny_model());
  }
  try {
    sh::Attachment::open(manifest);  // owner (us) alive, but the segment is gone
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kStale);
    EXPECT_TRUE(has_text(e.what(), name + " does not exist")) << e.what();
  }
}

TEST(Shm, ExportRejectsTensorsOutsideTheSegment) {
  sh::Export exp;
  uint32_t b = exp.add_shm(64);
  EXPECT_THROW(exp.add_tensor(sh::TensorDesc{"x", DType::kF32, {17}, {1}, b, 0}), Error);
  EXPECT_THROW(exp.add_tensor(sh::TensorDesc{"x", DType::kF32, {4}, {1}, b + 1, 0}), Error);
  exp.add_tensor(sh::TensorDesc{"x", DType::kF32, {16}, {1}, b, 0});
  EXPECT_THROW(exp.add_tensor(sh::TensorDesc{"x", DType::kF32, {1}, {1}, b, 0}), Error);  // same name
}

TEST(Cuda, FailsCleanlyWithoutAGpu) {
  if (!livetrain::cuda::devices().empty()) GTEST_SKIP() << "a GPU is visible; the GPU tests cover this path";
  sh::Export exp;
  EXPECT_THROW(exp.add_cuda_tensor("x", DType::kF32, {4}, {1}, 0x100000), Error);
  EXPECT_THROW(sh::CudaIpcMapping::open(std::string(128, '0'), "GPU-01234567-89ab-cdef-0123-456789abcdef", 16), Error);
  EXPECT_EQ(exp.buffers().size(), 0u);
}
