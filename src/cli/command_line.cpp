// The command-line reader of the `livetrain` subcommands (command_line.hpp).
#include "cli/command_line.hpp"

#include <cctype>
#include <cstdio>

#include "cli/commands.hpp"

namespace livetrain::cli {

CommandLine& CommandLine::flag(std::initializer_list<std::string_view> names, bool& out) {
  return flag(names, [&out] { out = true; });
}

CommandLine& CommandLine::flag(std::initializer_list<std::string_view> names, std::function<void()> set) {
  specs_.push_back({names, false, [set = std::move(set)](const std::string&) { set(); }});
  return *this;
}

CommandLine& CommandLine::value(std::string_view name, std::string& out) {
  return value(name, [&out](const std::string& v) { out = v; });
}

CommandLine& CommandLine::value(std::string_view name, std::function<void(const std::string&)> set) {
  specs_.push_back({{name}, true, std::move(set)});
  return *this;
}

CommandLine& CommandLine::positional(std::vector<std::string>& out, size_t max, std::string too_many) {
  positional_ = &out;
  max_positional_ = max;
  too_many_ = std::move(too_many);
  return *this;
}

const CommandLine::Spec* CommandLine::find(std::string_view arg) const {
  for (const Spec& s : specs_) {
    for (std::string_view n : s.names) {
      if (n == arg) return &s;
    }
  }
  return nullptr;
}

bool CommandLine::parse(const std::vector<std::string>& args) const {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(usage_, stdout);
      return false;
    }
    if (const Spec* s = find(a)) {
      if (!s->takes_value) {
        s->set(a);
      } else if (i + 1 < args.size()) {
        s->set(args[++i]);
      } else {
        throw UsageError(command_ + ": " + a + " needs a value");
      }
    } else if (!positional_) {
      throw UsageError(command_ + ": unknown argument '" + a + "' (see livetrain " + command_ + " --help)");
    } else if (a.size() > 1 && a[0] == '-' && !std::isdigit(static_cast<unsigned char>(a[1]))) {
      // "-1" is a (negative) number given where a positional argument goes: its reader names the problem.
      throw UsageError(command_ + ": unknown option '" + a + "'");
    } else if (positional_->size() >= max_positional_) {
      throw UsageError(command_ + ": " + too_many_);
    } else {
      positional_->push_back(a);
    }
  }
  return true;
}

}  // namespace livetrain::cli
