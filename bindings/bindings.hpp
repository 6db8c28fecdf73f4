// Internal: one init function per bound area of the core, and what several of them share.
#pragma once

#include <nanobind/nanobind.h>

#include <string>

#include "livetrain/dtype.hpp"
#include "livetrain/error.hpp"

namespace livetrain::bindings {

// A dtype from its safetensors name, as Python passes it; Error(kInvalidArg) for an unknown one, its
// message prefixed with `what` (e.g. `tensor "x"`) when given.
inline DType parse_dtype(const std::string& name, const std::string& what = {}) {
  auto dt = dtype_from_name(name);
  if (!dt) throw Error(ErrorCode::kInvalidArg, (what.empty() ? "" : what + ": ") + "unknown dtype \"" + name + "\"");
  return *dt;
}

void init_fs(nanobind::module_& m);
void init_safetensors(nanobind::module_& m);
void init_cuda(nanobind::module_& m);
void init_optim(nanobind::module_& m);
void init_loss(nanobind::module_& m);
void init_layout(nanobind::module_& m);
void init_sharing(nanobind::module_& m);
void init_checkpoint(nanobind::module_& m);
void init_tuning(nanobind::module_& m);

}  // namespace livetrain::bindings
