// Which of a build's GPU code runs on which GPU (cuda::code_for, by CUDA's compatibility rules), and what a
// build says about its own CUDA support: both work, and are tested, without a GPU.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "livetrain/cuda.hpp"

namespace livetrain::cuda {
namespace {

// What the release wheel and the default build compile (CMakeLists.txt).
const std::vector<std::string> kRelease = {"sm_80", "sm_90a", "sm_100", "compute_100"};

std::string code(int major, int minor, const std::vector<std::string>& built = kRelease, int driver = 13000,
                 std::string* problem = nullptr) {
  std::string ignored;
  return code_for(major, minor, built, driver, 13000, problem ? problem : &ignored);
}

TEST(CudaCode, MachineCodeForEachReleaseGpu) {
  EXPECT_EQ(code(8, 0), "sm_80");    // A100
  EXPECT_EQ(code(8, 6), "sm_80");    // A10, RTX 30xx: sm_80 code runs on later minor versions of 8
  EXPECT_EQ(code(8, 9), "sm_80");    // L4, L40, RTX 40xx
  EXPECT_EQ(code(9, 0), "sm_90a");   // H100, H200, GH200
  EXPECT_EQ(code(10, 0), "sm_100");  // B200
  EXPECT_EQ(code(10, 3), "sm_100");  // B300
}

TEST(CudaCode, NewerGpusRunThePtx) {
  EXPECT_EQ(code(12, 0), "compute_100 PTX");  // RTX 50xx: no sm_12x machine code in the build
  EXPECT_EQ(code(11, 0), "compute_100 PTX");
  // Without the PTX there is nothing for them.
  std::string problem;
  EXPECT_EQ(code(12, 0, {"sm_80", "sm_90a", "sm_100"}, 13000, &problem), "");
  EXPECT_NE(problem.find("no code for a sm_120 GPU"), std::string::npos) << problem;
  EXPECT_NE(problem.find("sm_80 sm_90a sm_100"), std::string::npos) << problem;
}

TEST(CudaCode, PtxNeedsADriverAsNewAsTheToolkit) {
  std::string problem;
  EXPECT_EQ(code(12, 0, kRelease, 12080, &problem), "");
  EXPECT_NE(problem.find("compute_100 PTX"), std::string::npos) << problem;
  EXPECT_NE(problem.find("driver supports CUDA 12.8, older than the CUDA 13.0"), std::string::npos) << problem;
  EXPECT_NE(problem.find("update the NVIDIA driver"), std::string::npos) << problem;
  // Machine code does not go through the driver's compiler: an older driver (CUDA minor-version
  // compatibility) still runs it.
  EXPECT_EQ(code(9, 0, kRelease, 12080), "sm_90a");
}

TEST(CudaCode, OlderGpusAreRefusedNamingTheBuild) {
  std::string problem;
  EXPECT_EQ(code(7, 0, kRelease, 13000, &problem), "");  // V100
  EXPECT_NE(problem.find("sm_70"), std::string::npos) << problem;
  EXPECT_NE(problem.find("sm_80 sm_90a sm_100 compute_100"), std::string::npos) << problem;
  EXPECT_EQ(code(7, 5, kRelease, 13000, &problem), "");  // T4
  EXPECT_NE(problem.find("sm_75"), std::string::npos) << problem;
}

TEST(CudaCode, ArchitectureSpecificCodeRunsOnlyOnItsOwnGpu) {
  // sm_90a uses Hopper-only instructions: neither a later Hopper minor version nor Blackwell runs it, and its
  // "a" PTX is no more portable.
  std::string problem;
  EXPECT_EQ(code(10, 0, {"sm_90a", "compute_90a"}, 13000, &problem), "");
  EXPECT_EQ(code(9, 1, {"sm_90a"}, 13000, &problem), "");
  EXPECT_EQ(code(9, 0, {"sm_90", "sm_90a"}), "sm_90a");  // the build's own code for this GPU is preferred
  EXPECT_EQ(code(9, 0, {"sm_80", "sm_90"}), "sm_90");
  EXPECT_EQ(code(8, 7, {"sm_80", "sm_86"}), "sm_86");  // the newest that runs
  EXPECT_EQ(code(9, 0, {"compute_80", "compute_90"}), "compute_90 PTX");
}

TEST(CudaCode, UnknownNamesAreIgnored) {
  std::string problem;
  EXPECT_EQ(code(9, 0, {"", "sm_", "sm_9x", "lto_90", "sm_90"}), "sm_90");
  EXPECT_EQ(code(9, 0, {}, 13000, &problem), "");
  EXPECT_NE(problem.find("it has: none"), std::string::npos) << problem;
}

TEST(CudaSupport, TheBuildDescribesItself) {
  std::string summary = support_summary();
  std::string reason;
  std::vector<DeviceInfo> devs = devices(&reason);
  if (!compiled_with_cuda()) {
    EXPECT_EQ(summary, kNoCudaSupport);
    EXPECT_TRUE(compiled_code().empty());
    EXPECT_TRUE(devs.empty());
    EXPECT_EQ(reason, kNoCudaSupport);
    EXPECT_EQ(device_problem(0), kNoCudaSupport);
    return;
  }
  EXPECT_NE(summary.find("CUDA " + std::to_string(runtime_version() / 1000) + "."), std::string::npos) << summary;
  ASSERT_FALSE(compiled_code().empty());
  for (const std::string& c : compiled_code()) {
    EXPECT_TRUE(c.rfind("sm_", 0) == 0 || c.rfind("compute_", 0) == 0) << c;  // as CMake read the -gencode flags
    EXPECT_NE(summary.find(c), std::string::npos) << summary;
  }
  if (devs.empty()) {
    EXPECT_FALSE(reason.empty());  // no driver here, an old one, or no GPU: each says so
    EXPECT_EQ(device_problem(0), "no CUDA device: " + reason);
  }
  for (const DeviceInfo& d : devs) {
    EXPECT_NE(d.code.empty(), d.code_problem.empty()) << d.name;
    EXPECT_EQ(device_problem(d.ordinal), d.code.empty() ? d.name + ": " + d.code_problem : "");
  }
  EXPECT_NE(device_problem(static_cast<int>(devs.size()) + 1).find("no CUDA device"), std::string::npos);
}

}  // namespace
}  // namespace livetrain::cuda
