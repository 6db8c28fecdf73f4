// The one Python module of livetrain: a table of contents; each area binds itself in its own file.
#include <nanobind/nanobind.h>

#include "bindings.hpp"
#include "livetrain/error.hpp"

namespace nb = nanobind;

NB_MODULE(_core, m) {
  m.doc() = "livetrain core (C++): safetensors, weight sharing, layouts, optimizer steps, loss passes, CUDA devices, checkpoint store.";
  m.attr("__version__") = LIVETRAIN_VERSION;
  // One exception class for every livetrain::Error; its message names the file, tensor or field.
  static nb::exception<livetrain::Error> error(m, "Error");
  livetrain::bindings::init_safetensors(m);
  livetrain::bindings::init_cuda(m);
  livetrain::bindings::init_optim(m);
  livetrain::bindings::init_loss(m);
  livetrain::bindings::init_layout(m);
  livetrain::bindings::init_sharing(m);
  livetrain::bindings::init_checkpoint(m);
  livetrain::bindings::init_tuning(m);
}
