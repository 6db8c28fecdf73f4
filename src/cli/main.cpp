// The `livetrain` command: dispatches subcommands; every failure is one line on stderr and a non-zero exit.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cli/command_line.hpp"
#include "cli/commands.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/json.hpp"

namespace livetrain::cli {

namespace {

constexpr const char* kUsage =
    "usage: livetrain <command> [options]\n"
    "\n"
    "livetrain fine-tunes a model while it is being served; this tool works on its files with no Python.\n"
    "\n"
    "commands:\n"
    "  inspect PATH      list the tensors of a safetensors file or model directory (dtypes, shapes,\n"
    "                    bytes, shard), validating every header strictly\n"
    "  manifest inspect FILE\n"
    "                    show a sharing manifest: buffers, tensors, whether its owner is alive, lease holder\n"
    "  diagnose --manifest FILE [--model-dir DIR]\n"
    "                    compare an engine's shared tensors, mapped through the model's layout, with the\n"
    "                    model's safetensors files: matched, only in engine, only on disk, mismatched\n"
    "  checkpoint save|list|restore|verify|materialize|gc MODEL\n"
    "                    the delta checkpoint store of a model's live weights\n"
    "  devices           list the CUDA devices this process sees (name, UUID, memory, which of this\n"
    "                    build's kernels runs on each), or why there are none\n"
    "  serve [--model DIR|default]\n"
    "                    serve a model (default: the embedded SmolLM2-135M-Instruct) and fine-tune it in\n"
    "                    place through POST /train (runs $LIVETRAIN_PYTHON -m livetrain.serve)\n"
    "  train FILE.jsonl  send training examples to a running `livetrain serve` and follow the job\n"
    "                    ($LIVETRAIN_PYTHON -m livetrain.trainer.client)\n"
    "  help [COMMAND]    show this text, or a command's own help\n"
    "\n"
    "options:\n"
    "  -h, --help        help (also after a command: livetrain inspect --help)\n"
    "  --version         print the version and this build's CUDA support\n"
    "\n"
    "serve and train need the livetrain Python package: the `livetrain` command that pip installs sets\n"
    "LIVETRAIN_PYTHON to its environment's Python; this binary alone uses python3 when it is unset.\n";

constexpr const char* kDevicesUsage =
    "usage: livetrain devices [--json]\n"
    "\n"
    "List the CUDA devices visible to this process: ordinal, name, UUID, memory, compute capability,\n"
    "and the code of this build that runs there (its own machine code, e.g. sm_90a, or PTX that the\n"
    "driver compiles for GPUs newer than the build); with no device, why (no driver, a driver older than\n"
    "this build's CUDA, or a build without CUDA support). Ordinals depend on CUDA_VISIBLE_DEVICES; UUIDs\n"
    "identify a GPU across processes.\n"
    "\n"
    "options:\n"
    "  --json            print JSON instead of a table\n";

int run_devices(const std::vector<std::string>& args) {
  bool as_json = false;
  if (!CommandLine("devices", kDevicesUsage).flag({"--json"}, as_json).parse(args)) return 0;
  std::string reason;
  auto devs = cuda::devices(&reason);
  if (as_json) {
    json::Value root = json::Value::object();
    root.set("compiled_with_cuda", json::Value::boolean(cuda::compiled_with_cuda()));
    root.set("cuda_support", json::Value::string(cuda::support_summary()));
    json::Value list = json::Value::array();
    for (const auto& d : devs) {
      json::Value e = json::Value::object();
      e.set("ordinal", json::Value::unsigned_integer(static_cast<uint64_t>(d.ordinal)));
      e.set("name", json::Value::string(d.name));
      e.set("uuid", json::Value::string(d.uuid));
      e.set("total_memory", json::Value::unsigned_integer(d.total_memory));
      e.set("compute_capability",
            json::Value::string(std::to_string(d.compute_major) + "." + std::to_string(d.compute_minor)));
      e.set("code", json::Value::string(d.code));
      if (d.code.empty()) e.set("code_problem", json::Value::string(d.code_problem));
      list.push(std::move(e));
    }
    root.set("devices", std::move(list));
    if (devs.empty()) root.set("reason", json::Value::string(reason));
    std::fputs(root.dump_pretty().c_str(), stdout);
    return 0;
  }
  std::printf("%s\n", cuda::support_summary().c_str());
  if (devs.empty()) {
    std::printf("no CUDA devices: %s\n", reason.c_str());
    return 0;
  }
  for (const auto& d : devs) {
    std::string code = d.code.empty() ? "no code: " + d.code_problem : "runs " + d.code;
    std::printf("%d  %-28s %s  %.1f GiB  sm_%d%d  %d SMs  %s\n", d.ordinal, d.name.c_str(), d.uuid.c_str(),
                static_cast<double>(d.total_memory) / (1ull << 30), d.compute_major, d.compute_minor, d.multiprocessors,
                code.c_str());
  }
  return 0;
}

// serve and train live in Python (PyTorch, the HTTP servers): the CLI replaces itself with the
// interpreter so that signals (Ctrl-C, SIGTERM) reach the Python supervisor directly.
constexpr const char* kServeUsage =
    "usage: livetrain serve [--model DIR|default] [--device cpu|cuda] [--port N] [--api-key KEY] [options]\n"
    "\n"
    "Runs `$LIVETRAIN_PYTHON -m livetrain.serve` (the installed `livetrain` command sets it to its\n"
    "environment's Python; python3 when unset) with these arguments: the reference\n"
    "engine (OpenAI-style /v1/completions, /v1/chat/completions) and the trainer (POST /train,\n"
    "GET /train/status, POST /checkpoint, GET /checkpoints, POST /rollback) as two processes sharing the\n"
    "weights, which start from the newest generation of the model's checkpoint store. docs/serve.md.\n"
    "Its options:\n\n";

constexpr const char* kTrainUsage =
    "usage: livetrain train [--url URL] [--api-key KEY] FILE.jsonl [options]\n"
    "\n"
    "Runs `$LIVETRAIN_PYTHON -m livetrain.trainer.client` (the installed `livetrain` command sets it to its\n"
    "environment's Python; python3 when unset): sends FILE (one example per line) to a running\n"
    "`livetrain serve` as one job and shows its progress. Its options:\n\n";

[[noreturn]] void exec_python(const char* module, const char* usage, const std::vector<std::string>& args) {
  for (const std::string& a : args) {
    if (a == "-h" || a == "--help") {
      std::fputs(usage, stdout);
      std::fflush(stdout);  // Python's own option list follows on the same stream
      break;
    }
  }
  const char* env = std::getenv("LIVETRAIN_PYTHON");
  std::string python = env && *env ? env : "python3";
  std::vector<std::string> words = {python, "-m", module};
  words.insert(words.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  execvp(python.c_str(), argv.data());
  throw Error(ErrorCode::kIo, "cannot run " + python +
                                  " (run the `livetrain` command that pip installed, or set "
                                  "LIVETRAIN_PYTHON to the Python that has the livetrain package): " +
                                  std::strerror(errno));
}

int dispatch(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  std::string cmd = args.front();
  args.erase(args.begin());
  if (cmd == "-h" || cmd == "--help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (cmd == "--version") {
    std::printf("livetrain %s (%s)\n", LIVETRAIN_VERSION, cuda::support_summary().c_str());
    return 0;
  }
  if (cmd == "help") {
    if (args.empty()) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    cmd = args.front();
    args = {"--help"};
  }
  if (cmd == "inspect") return run_inspect(args);
  if (cmd == "manifest") return run_manifest(args);
  if (cmd == "checkpoint") return run_checkpoint(args);
  if (cmd == "diagnose") return run_diagnose(args);
  if (cmd == "devices") return run_devices(args);
  if (cmd == "serve") exec_python("livetrain.serve", kServeUsage, args);
  if (cmd == "train") exec_python("livetrain.trainer.client", kTrainUsage, args);
  throw UsageError("unknown command '" + cmd + "' (see livetrain --help)");
}

}  // namespace

}  // namespace livetrain::cli

int main(int argc, char** argv) {
  try {
    return livetrain::cli::dispatch(argc, argv);
  } catch (const livetrain::cli::UsageError& e) {
    std::fprintf(stderr, "livetrain: %s\n", e.what());
    return 2;
  } catch (const livetrain::Error& e) {
    std::fprintf(stderr, "livetrain: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "livetrain: internal error: %s\n", e.what());
    return 3;
  }
}
