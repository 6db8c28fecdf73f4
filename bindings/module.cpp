// The one Python module of livetrain: a table of contents; each area binds itself in its own file.
#include <nanobind/nanobind.h>

#include <exception>
#include <string>

#include "bindings.hpp"
#include "livetrain/error.hpp"

namespace nb = nanobind;

namespace {

// One Python class per livetrain::ErrorCode, each a subclass of _core.Error, so that callers catch the
// kind of failure by class and never parse messages; the message still names the file, tensor or field.
struct ErrorClass {
  livetrain::ErrorCode code;
  const char* name;
  const char* doc;
};

using livetrain::ErrorCode;
constexpr ErrorClass kErrorClasses[] = {
    {ErrorCode::kIo, "IoError", "A system call on a file failed (open, read, write, fsync, rename, mmap)."},
    {ErrorCode::kFormat, "FormatError", "Bytes from outside do not follow the format (file, header, manifest)."},
    {ErrorCode::kInvalidArg, "InvalidArgumentError", "The caller passed something impossible (dtype, shape, size)."},
    {ErrorCode::kNotFound, "NotFoundError", "A named file, tensor or generation does not exist."},
    {ErrorCode::kOverflow, "SizeOverflowError", "A size computed from outside input does not fit in 64 bits."},
    {ErrorCode::kUnsupported, "UnsupportedError", "Well-formed, but livetrain does not handle it."},
    {ErrorCode::kCuda, "CudaError", "A CUDA call failed."},
    {ErrorCode::kStale, "StaleError", "A manifest describes an owner process that is gone."},
    {ErrorCode::kBusy, "BusyError",
     "An exclusive resource (trainer lease, checkpoint store) is held by another process."},
};
constexpr size_t kNumErrorClasses = sizeof(kErrorClasses) / sizeof(kErrorClasses[0]);

// The classes, created once at import; [kNumErrorClasses] is the base class _core.Error. Module state
// would be needed for subinterpreters, which nanobind's NB_STATIC build of this module does not support.
PyObject* error_types[kNumErrorClasses + 1] = {};

PyObject* error_type(ErrorCode code) {
  for (size_t i = 0; i < kNumErrorClasses; ++i) {
    if (kErrorClasses[i].code == code) return error_types[i];
  }
  return error_types[kNumErrorClasses];  // a code added to the core but not here: still a _core.Error
}

void register_errors(nb::module_& m) {
  const char* module_name = PyModule_GetName(m.ptr());
  if (!module_name) throw nb::python_error();
  auto make = [&](const char* name, const char* doc, PyObject* base) {
    PyObject* type = PyErr_NewExceptionWithDoc((std::string(module_name) + "." + name).c_str(), doc, base, nullptr);
    if (!type) throw nb::python_error();
    m.attr(name) = nb::handle(type);  // the module holds a reference; `type`'s own one is kept forever
    return type;
  };
  PyObject* base = make("Error", "Every failure of the livetrain core; the subclass says which kind.", PyExc_Exception);
  error_types[kNumErrorClasses] = base;
  for (size_t i = 0; i < kNumErrorClasses; ++i)
    error_types[i] = make(kErrorClasses[i].name, kErrorClasses[i].doc, base);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const livetrain::Error& e) {
      PyErr_SetString(error_type(e.code()), e.what());
    }
  });
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() =
      "livetrain core (C++): durable writes, safetensors, weight sharing, layouts, optimizer steps, loss passes, CUDA "
      "devices, checkpoint store.";
  m.attr("__version__") = LIVETRAIN_VERSION;
  register_errors(m);
  livetrain::bindings::init_fs(m);
  livetrain::bindings::init_safetensors(m);
  livetrain::bindings::init_cuda(m);
  livetrain::bindings::init_optim(m);
  livetrain::bindings::init_loss(m);
  livetrain::bindings::init_layout(m);
  livetrain::bindings::init_sharing(m);
  livetrain::bindings::init_checkpoint(m);
  livetrain::bindings::init_tuning(m);
}
