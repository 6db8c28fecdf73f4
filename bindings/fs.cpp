// Bindings of the core's durable writes (livetrain::fs, docs/durable-writes.md), so that every file
// livetrain writes, from C++ or Python, goes through one implementation of the protocol.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings.hpp"
#include "livetrain/fs.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

void init_fs(nb::module_& m) {
  m.def(
      "write_file_atomic",
      [](const std::string& path, nb::bytes data, uint32_t mode) {
        if (mode > 07777)
          throw Error(ErrorCode::kInvalidArg, path + ": mode " + std::to_string(mode) + " is not a file mode");
        // `data` is immutable and the caller holds it, so its bytes stay valid without the GIL.
        std::string_view content(data.c_str(), data.size());
        nb::gil_scoped_release release;
        fs::write_file_atomic(path, content, static_cast<mode_t>(mode));
      },
      nb::arg("path"), nb::arg("data"), nb::arg("mode") = 0644,
      "Replace `path` by `data` crash-safely: temporary file beside it, fsync, chmod `mode`, rename over it, "
      "fsync the directory; after a crash `path` holds the old or the new bytes, never a mix. A symlink at "
      "`path` is replaced, not written through. Raises IoError naming the step and the file.");
  m.def(
      "publish_directory",
      [](const std::string& tmp_dir, const std::string& final_dir) {
        nb::gil_scoped_release release;
        fs::publish_directory(tmp_dir, final_dir);
      },
      nb::arg("tmp_dir"), nb::arg("final_dir"),
      "Make a directory filled under a temporary name appear complete and durable as `final_dir`: fsync "
      "every file and directory in `tmp_dir`, rename it to `final_dir`, fsync the parent. Never replaces "
      "anything: raises IoError naming `final_dir` when it exists (then nothing is renamed).");
}

}  // namespace livetrain::bindings
