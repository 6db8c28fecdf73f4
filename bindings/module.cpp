// The one Python module of livetrain: a table of contents; each area binds itself in its own file.
#include <dirent.h>
#include <fcntl.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "bindings.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"

namespace nb = nanobind;

namespace {

// One Python class per livetrain::ErrorCode, each a subclass of _core.Error, so that callers catch the
// kind of failure (a busy lease, a missing file) instead of matching message text.
struct ErrorClass {
  livetrain::ErrorCode code;
  const char* name;
};
constexpr ErrorClass kErrorClasses[] = {
    {livetrain::ErrorCode::kIo, "IoError"},
    {livetrain::ErrorCode::kFormat, "FormatError"},
    {livetrain::ErrorCode::kInvalidArg, "InvalidArgumentError"},
    {livetrain::ErrorCode::kNotFound, "NotFoundError"},
    {livetrain::ErrorCode::kOverflow, "SizeOverflowError"},
    {livetrain::ErrorCode::kUnsupported, "UnsupportedError"},
    {livetrain::ErrorCode::kCuda, "CudaError"},
    {livetrain::ErrorCode::kStale, "StaleError"},
    {livetrain::ErrorCode::kBusy, "BusyError"},
};
constexpr size_t kErrorCodes = sizeof(kErrorClasses) / sizeof(kErrorClasses[0]);

void init_errors(nb::module_& m) {
  static nb::exception<livetrain::Error> base(m, "Error");
  static PyObject* by_code[kErrorCodes] = {};
  for (const ErrorClass& c : kErrorClasses) {
    by_code[static_cast<size_t>(c.code)] = nb::detail::exception_new(m.ptr(), c.name, base.ptr());
  }
  // Registered after the base class's translator, so it is tried first.
  nb::register_exception_translator(
      [](const std::exception_ptr& p, void*) {
        try {
          std::rethrow_exception(p);
        } catch (const livetrain::Error& e) {
          auto i = static_cast<size_t>(e.code());
          PyErr_SetString(i < kErrorCodes && by_code[i] ? by_code[i] : base.ptr(), e.what());
        }
      },
      nullptr);
}

// tmp_dir's regular files and tmp_dir itself fsynced, tmp_dir renamed to final_dir (which must not exist),
// the parent fsynced: a directory that appears complete or not at all.
void publish_directory(const std::string& tmp_dir, const std::string& final_dir) {
  namespace fs = livetrain::fs;
  DIR* d = ::opendir(tmp_dir.c_str());
  if (!d) throw livetrain::io_error("cannot open directory " + tmp_dir + " to publish it");
  try {
    while (dirent* e = ::readdir(d)) {
      std::string path = fs::join(tmp_dir, e->d_name);
      struct stat st;
      if (::lstat(path.c_str(), &st) != 0) throw livetrain::io_error("stat " + path);
      if (!S_ISREG(st.st_mode)) continue;
      fs::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd.valid()) throw livetrain::io_error("cannot open " + path + " to fsync it");
      if (::fsync(fd.get()) != 0) throw livetrain::io_error("fsync of " + path + " failed");
    }
  } catch (...) {
    ::closedir(d);
    throw;
  }
  ::closedir(d);
  fs::fsync_dir(tmp_dir);
#ifdef RENAME_NOREPLACE
  if (::renameat2(AT_FDCWD, tmp_dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_NOREPLACE) != 0) {
    if (errno == EEXIST) throw livetrain::Error(livetrain::ErrorCode::kIo, final_dir + " already exists");
    throw livetrain::io_error("rename " + tmp_dir + " to " + final_dir);
  }
#else
  // Check, then rename: racy against another process creating final_dir in between.
  if (fs::exists(final_dir)) throw livetrain::Error(livetrain::ErrorCode::kIo, final_dir + " already exists");
  if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) throw livetrain::io_error("rename " + tmp_dir + " to " + final_dir);
#endif
  fs::fsync_dir(fs::dirname(final_dir));
}

void init_fs(nb::module_& m) {
  m.def(
      "write_file_atomic",
      [](const std::string& path, nb::bytes data, int mode) {
        std::string content(data.c_str(), data.size());
        nb::gil_scoped_release release;
        livetrain::fs::write_file_atomic(path, content, static_cast<mode_t>(mode));
      },
      nb::arg("path"), nb::arg("data"), nb::arg("mode") = 0644,
      "Replaces `path` by `data` crash-safely: temporary file, fsync, rename, fsync of the directory.");
  m.def(
      "publish_directory",
      [](const std::string& tmp_dir, const std::string& final_dir) {
        nb::gil_scoped_release release;
        publish_directory(tmp_dir, final_dir);
      },
      nb::arg("tmp_dir"), nb::arg("final_dir"),
      "fsyncs every regular file in tmp_dir and tmp_dir, renames it to final_dir, fsyncs the parent; "
      "IoError naming final_dir when it exists.");
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "livetrain core (C++): safetensors, weight sharing, layouts, optimizer steps, loss passes, CUDA devices, checkpoint store.";
  m.attr("__version__") = LIVETRAIN_VERSION;
  // _core.Error for every livetrain::Error, raised as the subclass of its code; messages name the file,
  // tensor or field.
  init_errors(m);
  init_fs(m);
  livetrain::bindings::init_safetensors(m);
  livetrain::bindings::init_cuda(m);
  livetrain::bindings::init_optim(m);
  livetrain::bindings::init_loss(m);
  livetrain::bindings::init_layout(m);
  livetrain::bindings::init_sharing(m);
  livetrain::bindings::init_ckpt(m);
}
