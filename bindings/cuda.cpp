// Bindings: CUDA device enumeration.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.hpp"
#include "livetrain/cuda.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

void init_cuda(nb::module_& m) {
  m.def("cuda_compiled", &cuda::compiled_with_cuda, "Whether this build contains CUDA code.");
  m.def("cuda_support", &cuda::support_summary,
        "One line on this build's CUDA support: the runtime and the GPU code it has, or that it was built "
        "without CUDA support.");
  m.def("cuda_device_problem", &cuda::device_problem, nb::arg("ordinal"),
        "Why this build cannot run its kernels on CUDA device `ordinal` ('' when it can): no CUDA support in "
        "the build, no such device visible (and why), or no code of this build for that GPU.");
  m.def(
      "cuda_devices",
      []() {
        std::string reason;
        nb::list out;
        for (const auto& d : cuda::devices(&reason)) {
          nb::dict e;
          e["ordinal"] = d.ordinal;
          e["name"] = d.name;
          e["uuid"] = d.uuid;
          e["total_memory"] = d.total_memory;
          e["compute_capability"] = nb::make_tuple(d.compute_major, d.compute_minor);
          e["multiprocessors"] = d.multiprocessors;
          e["code"] = d.code;  // "" when none of this build's code runs there: code_problem says why
          e["code_problem"] = d.code_problem;
          out.append(e);
        }
        return nb::make_tuple(out, reason);
      },
      "(devices, reason): the visible CUDA devices as dicts, and why there are none when the list is empty.");
}

}  // namespace livetrain::bindings
