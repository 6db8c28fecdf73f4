// Internal: one init function per bound area of the core.
#pragma once

#include <nanobind/nanobind.h>

namespace livetrain::bindings {

void init_safetensors(nanobind::module_& m);
void init_cuda(nanobind::module_& m);
void init_optim(nanobind::module_& m);
void init_loss(nanobind::module_& m);
void init_layout(nanobind::module_& m);
void init_sharing(nanobind::module_& m);
void init_ckpt(nanobind::module_& m);

}  // namespace livetrain::bindings
