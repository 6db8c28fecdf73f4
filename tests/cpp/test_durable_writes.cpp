// The crash-safe write protocol: after SIGKILL at any instant the target holds the old or the new content,
// never a mix; a failure leaves the old file and no temporary behind; symlinks are never written through.
// Its directory form, publish_directory: a published name holds a complete tree and never replaces one.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>

#include "helpers.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"

namespace fs = livetrain::fs;
using livetrain::Error;

namespace {

uint64_t fnv1a(const char* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 1099511628211ull;
  return h;
}

// A self-checking content for `version`: "LTV1", version, payload size, payload, FNV-1a of all before.
std::string content(uint64_t version) {
  std::mt19937_64 rng(version);
  size_t size = rng() % (1 << 20) + 1;
  std::string out = "LTV1";
  out.append(reinterpret_cast<const char*>(&version), 8);
  out.append(reinterpret_cast<const char*>(&size), 8);
  size_t start = out.size();
  out.resize(start + size);
  for (size_t i = 0; i < size; ++i) out[start + i] = static_cast<char>(rng());
  uint64_t sum = fnv1a(out.data(), out.size());
  out.append(reinterpret_cast<const char*>(&sum), 8);
  return out;
}

// The version held by a complete, intact file; -1 if the file is torn or corrupt.
int64_t check(const std::string& bytes) {
  if (bytes.size() < 28 || bytes.compare(0, 4, "LTV1") != 0) return -1;
  uint64_t version, size, sum;
  std::memcpy(&version, bytes.data() + 4, 8);
  std::memcpy(&size, bytes.data() + 12, 8);
  if (bytes.size() != 20 + size + 8) return -1;
  std::memcpy(&sum, bytes.data() + 20 + size, 8);
  if (sum != fnv1a(bytes.data(), 20 + size)) return -1;
  return static_cast<int64_t>(version);
}

int count_temps(const std::string& dir, bool remove) {
  int n = 0;
  DIR* d = opendir(dir.c_str());
  while (dirent* e = readdir(d)) {
    if (fs::is_atomic_temp_name(e->d_name)) {
      ++n;
      if (remove) unlink((dir + "/" + e->d_name).c_str());
    }
  }
  closedir(d);
  return n;
}

}  // namespace

TEST(AtomicWrite, ReplacesContentAndSetsMode) {
  livetrain::testing::TempDir dir;
  std::string path = dir.file("f");
  fs::write_file_atomic(path, "one", 0600);
  fs::write_file_atomic(path, "two!", 0640);
  EXPECT_EQ(fs::read_file(path), "two!");
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  EXPECT_EQ(count_temps(dir.path(), false), 0);
}

// Writer::write_at rewrites bytes already written (a header whose content is known last) and refuses a range
// past them.
TEST(AtomicWrite, WriteAtRewritesWhatWasWritten) {
  livetrain::testing::TempDir dir;
  std::string path = dir.file("f");
  fs::write_file_atomic(path, [](fs::Writer& w) {
    w.write(std::string("abcdef"));
    w.write_at(2, "XY", 2);
    EXPECT_EQ(w.bytes_written(), 6u);
    try {
      w.write_at(5, "ZZ", 2);
      ADD_FAILURE() << "write_at past the end was accepted";
    } catch (const livetrain::Error& e) {
      EXPECT_EQ(e.code(), livetrain::ErrorCode::kInvalidArg);
    }
    w.write(std::string("g"));
  });
  EXPECT_EQ(fs::read_file(path), "abXYefg");
}

TEST(AtomicWrite, ModeIsLessTheUmask) {
  // Regression test for issue #13: the store's and the trainer's files were 0644 although livetrain's
  // processes set umask 077 (fchmod does not apply the umask; open(2) does).
  livetrain::testing::TempDir dir;
  std::string path = dir.file("f");
  const mode_t old = ::umask(077);
  fs::write_file_atomic(path, "secret");
  ::umask(old);
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(AtomicWrite, FailureLeavesOldFileAndNoTemporary) {
  livetrain::testing::TempDir dir;
  std::string path = dir.file("f");
  fs::write_file_atomic(path, "old");
  EXPECT_THROW(fs::write_file_atomic(path,
                                     [](fs::Writer& w) {
                                       w.write("partial new content");
                                       throw Error(livetrain::ErrorCode::kInvalidArg, "caller gave up");
                                     }),
               Error);
  EXPECT_EQ(fs::read_file(path), "old");
  EXPECT_EQ(count_temps(dir.path(), false), 0);
}

// I/O error injection: a file-size limit makes write() fail with EFBIG part-way, as a full disk would.
TEST(AtomicWrite, WriteErrorIsReportedAndOldFileSurvives) {
  livetrain::testing::TempDir dir;
  std::string path = dir.file("f");
  fs::write_file_atomic(path, content(1));
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    signal(SIGXFSZ, SIG_IGN);
    rlimit lim{4096, 4096};
    setrlimit(RLIMIT_FSIZE, &lim);
    try {
      fs::write_file_atomic(path, content(2));
    } catch (const Error& e) {
      bool names_file = std::string(e.what()).find(path) != std::string::npos;
      bool says_why = std::string(e.what()).find("File too large") != std::string::npos;
      _exit(names_file && says_why ? 42 : 43);
    }
    _exit(44);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 42) << "43: message lacks the path or reason; 44: no error raised";
  EXPECT_EQ(check(fs::read_file(path)), 1);
  EXPECT_EQ(count_temps(dir.path(), false), 0);
}

TEST(AtomicWrite, ReplacesSymlinkInsteadOfWritingThroughIt) {
  livetrain::testing::TempDir dir;
  fs::write_file_atomic(dir.file("blob"), "shared cache blob");
  ASSERT_EQ(symlink("blob", dir.file("link").c_str()), 0);
  fs::write_file_atomic(dir.file("link"), "new");
  EXPECT_EQ(fs::read_file(dir.file("blob")), "shared cache blob");
  struct stat st {};
  ASSERT_EQ(lstat(dir.file("link").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(fs::read_file(dir.file("link")), "new");
}

// A child rewrites the file in a loop; it is killed with SIGKILL at a random instant, many times. After
// every kill the file must hold one complete version, never older than the last one seen.
TEST(AtomicWrite, SurvivesKillAtRandomPoints) {
  const char* env = getenv("LIVETRAIN_KILL_ITERATIONS");
  const int iterations = env ? atoi(env) : 200;
  livetrain::testing::TempDir dir;
  std::string path = dir.file("target");
  fs::write_file_atomic(path, content(0));
  std::mt19937_64 rng(12345);
  int64_t last = 0;
  int temps_left = 0;
  uint64_t next_version = 1;
  for (int it = 0; it < iterations; ++it) {
    uint64_t first = next_version;
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (uint64_t v = first;; ++v) fs::write_file_atomic(path, content(v));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer died on its own at iteration " << it;
    int64_t v = check(fs::read_file(path));
    ASSERT_GE(v, 0) << "torn file after kill at iteration " << it;
    ASSERT_GE(v, last) << "went back in time at iteration " << it;
    last = v;
    next_version = static_cast<uint64_t>(v) + 1000;  // later versions are distinguishable
    temps_left += count_temps(dir.path(), true);
  }
  RecordProperty("kills", iterations);
  RecordProperty("temporaries_left_by_kills", temps_left);
}

namespace {

// A directory holding a file, a subdirectory with a file, and a symlink, as a converter would fill it.
void fill_tree(const std::string& dir, uint64_t version) {
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  ASSERT_EQ(mkdir((dir + "/sub").c_str(), 0755), 0);
  livetrain::testing::write_bytes(dir + "/a", content(version));
  livetrain::testing::write_bytes(dir + "/sub/b", content(version + 1));
  ASSERT_EQ(symlink("a", (dir + "/link").c_str()), 0);
}

// Whether `dir` is exactly what fill_tree(dir, version) wrote.
bool complete_tree(const std::string& dir, uint64_t version) {
  char target[8] = {};
  return check(livetrain::testing::read_bytes(dir + "/a")) == static_cast<int64_t>(version) &&
         check(livetrain::testing::read_bytes(dir + "/sub/b")) == static_cast<int64_t>(version + 1) &&
         readlink((dir + "/link").c_str(), target, sizeof(target)) == 1 && target[0] == 'a';
}

}  // namespace

TEST(PublishDirectory, RenamesAFilledDirectoryIntoPlace) {
  livetrain::testing::TempDir dir;
  fill_tree(dir.file(".tmp-model"), 7);
  fs::publish_directory(dir.file(".tmp-model"), dir.file("model") + "/");  // a trailing slash is allowed
  EXPECT_FALSE(fs::exists(dir.file(".tmp-model")));
  EXPECT_TRUE(complete_tree(dir.file("model"), 7));
}

TEST(PublishDirectory, NeverReplacesWhatExists) {
  livetrain::testing::TempDir dir;
  fill_tree(dir.file("tmp"), 1);
  const std::string tmp = dir.file("tmp");
  // An empty directory (which plain rename would replace), a full one, and a file.
  ASSERT_EQ(mkdir(dir.file("empty").c_str(), 0755), 0);
  fill_tree(dir.file("full"), 5);
  fs::write_file_atomic(dir.file("file"), "x");
  for (const char* name : {"empty", "full", "file"}) {
    const std::string final_dir = dir.file(name);
    try {
      fs::publish_directory(tmp, final_dir);
      ADD_FAILURE() << "published over " << final_dir;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), livetrain::ErrorCode::kIo);
      EXPECT_NE(std::string(e.what()).find(final_dir + " already exists"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(complete_tree(tmp, 1)) << name;
  }
  EXPECT_TRUE(fs::is_directory(dir.file("empty")));
  EXPECT_TRUE(complete_tree(dir.file("full"), 5));
  EXPECT_EQ(fs::read_file(dir.file("file")), "x");
}

TEST(PublishDirectory, MissingSourceIsNotFound) {
  livetrain::testing::TempDir dir;
  try {
    fs::publish_directory(dir.file("absent"), dir.file("model"));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), livetrain::ErrorCode::kNotFound);
    EXPECT_NE(std::string(e.what()).find(dir.file("absent")), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir.file("model")));
}

// A child fills and publishes directories one after another and is killed with SIGKILL at a random
// instant: every published name must hold a complete tree (a temporary may be left half-filled).
TEST(PublishDirectory, SurvivesKillAtRandomPoints) {
  livetrain::testing::TempDir dir;
  std::mt19937_64 rng(777);
  uint64_t next = 0;
  for (int it = 0; it < 40; ++it) {
    const uint64_t first = next;
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (uint64_t v = first;; v += 2) {
        const std::string tmp = dir.file(".tmp-" + std::to_string(v)), final_dir = dir.file("v" + std::to_string(v));
        fill_tree(tmp, v);
        fs::publish_directory(tmp, final_dir);
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer died on its own at iteration " << it;
    for (uint64_t v = first;; v += 2) {
      if (!fs::exists(dir.file("v" + std::to_string(v)))) break;
      ASSERT_TRUE(complete_tree(dir.file("v" + std::to_string(v)), v)) << "torn directory v" << v;
      next = v + 2;
    }
    next += 2;  // a half-filled temporary of the next version may be left; never reuse its name
  }
}
