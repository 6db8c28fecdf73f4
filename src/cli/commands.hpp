// Internal: the subcommands of the `livetrain` CLI.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace livetrain::cli {

// Wrong command-line arguments: exit code 2, one line.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

int run_inspect(const std::vector<std::string>& args);
int run_manifest(const std::vector<std::string>& args);
int run_checkpoint(const std::vector<std::string>& args);
int run_diagnose(const std::vector<std::string>& args);

std::string human_bytes(unsigned long long bytes);

}  // namespace livetrain::cli
