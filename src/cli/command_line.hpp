// Internal: the command-line reader every `livetrain` subcommand uses, so that they share one set of
// conventions: arguments are read left to right; -h/--help prints the command's usage on stdout; an
// option's value is the next argument, whatever it looks like; anything else starting with '-' is an
// error, except a number ("-1" goes where a positional argument would, for its reader to refuse); the
// first error ends the command with a UsageError (exit code 2, one line).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace livetrain::cli {

class CommandLine {
 public:
  // `command` starts every error message ("checkpoint: ..."); `usage` is what -h/--help prints.
  CommandLine(std::string command, const char* usage) : command_(std::move(command)), usage_(usage) {}

  // An option without a value, under any of `names` (e.g. {"-q", "--quiet"}): sets `out`, or calls `set`.
  CommandLine& flag(std::initializer_list<std::string_view> names, bool& out);
  CommandLine& flag(std::initializer_list<std::string_view> names, std::function<void()> set);
  // An option taking the next argument as its value; a later occurrence replaces an earlier one.
  CommandLine& value(std::string_view name, std::string& out);
  CommandLine& value(std::string_view name, std::function<void(const std::string&)> set);
  // Accepts positional arguments into `out`; more than `max` is the error "<command>: <too_many>".
  // Without this, a positional argument is an unknown argument.
  CommandLine& positional(std::vector<std::string>& out, size_t max = SIZE_MAX, std::string too_many = {});

  // Reads `args`; false when -h/--help was met (the usage is then printed), true otherwise. Errors:
  // "<command>: NAME needs a value"; with positional arguments accepted "<command>: unknown option 'X'",
  // without "<command>: unknown argument 'X' (see livetrain <command> --help)".
  bool parse(const std::vector<std::string>& args) const;

 private:
  struct Spec {
    std::vector<std::string_view> names;
    bool takes_value = false;
    std::function<void(const std::string&)> set;
  };
  const Spec* find(std::string_view arg) const;

  std::string command_;
  const char* usage_;
  std::vector<Spec> specs_;
  std::vector<std::string>* positional_ = nullptr;
  size_t max_positional_ = 0;
  std::string too_many_;
};

}  // namespace livetrain::cli
