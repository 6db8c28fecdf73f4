// Bindings: the internal performance knobs (include/livetrain/tuning.hpp) and the CPU threads the core uses,
// for the benchmarks' sweeps.
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include "bindings.hpp"
#include "livetrain/parallel.hpp"
#include "livetrain/tuning.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

void init_tuning(nb::module_& m) {
  m.def(
      "tuning",
      []() {
        nb::dict out;
        for (const auto& k : tuning::list()) {
          nb::dict d;
          d["value"] = k.value;
          d["default"] = k.default_value;
          d["choices"] = k.choices;
          d["min"] = k.min;
          d["max"] = k.max;
          d["help"] = k.help;
          out[k.name.c_str()] = d;
        }
        return out;
      },
      "The internal performance knobs (docs/tuning.md): {name: {value, default, choices, min, max, help}}.");
  m.def("tuning_set", &tuning::set, nb::arg("name"), nb::arg("value"),
        "Sets an internal performance knob for the following steps and saves (benchmarks only).");
  m.def("tuning_reset", &tuning::reset, "Every internal performance knob back to its default.");
  m.def("num_threads", &num_threads,
        "The CPU threads of the core's parallel regions (LIVETRAIN_NUM_THREADS, else the CPUs this process may run "
        "on: its affinity mask and cgroup CPU quota), for the benchmarks' reports.");
  m.def(
      "apollo_update_variants",
      []() {
        nb::list out;
        for (const auto& setting : tuning::apollo_update_variants()) {
          nb::dict d;
          for (const auto& [name, value] : setting) d[name.c_str()] = value;
          out.append(d);
        }
        return out;
      },
      "The compiled variants of the batched APOLLO update of bf16 weights: one {knob: value} setting of the "
      "apollo.update_* knobs per distinct choice of kernels (docs/tuning.md), for the tests.");
}

}  // namespace livetrain::bindings
