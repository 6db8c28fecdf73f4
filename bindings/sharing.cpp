// Bindings: weight sharing. Export and Attachment objects; attached tensors cross as DLPack tensors
// (CPU or CUDA) whose owner keeps the Attachment, and so the mappings, alive. Logic stays in the core.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "bindings.hpp"
#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace sh = livetrain::sharing;

namespace {

using Tensor = nb::ndarray<nb::pytorch>;

// DLPack has no codes for the 8-bit float formats torch knows; those cross as uint8 of the same shape
// and strides, and livetrain/sharing.py reinterprets them with Tensor.view(dtype).
nb::dlpack::dtype dlpack_dtype(DType d) {
  using C = nb::dlpack::dtype_code;
  auto make = [](C code, uint32_t bits) {
    return nb::dlpack::dtype{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
  };
  switch (d) {
    case DType::kBool: return make(C::Bool, 8);
    case DType::kU8:
    case DType::kU16:
    case DType::kU32:
    case DType::kU64: return make(C::UInt, dtype_bits(d));
    case DType::kI8:
    case DType::kI16:
    case DType::kI32:
    case DType::kI64: return make(C::Int, dtype_bits(d));
    case DType::kF16:
    case DType::kF32:
    case DType::kF64: return make(C::Float, dtype_bits(d));
    case DType::kBF16: return make(C::Bfloat, 16);
    case DType::kC64: return make(C::Complex, 64);
    default: return make(C::UInt, dtype_bits(d));
  }
}

sh::ModelDesc model_desc(const std::string& path, const std::string& config_json, const std::string& engine,
                         uint32_t tp_rank, uint32_t tp_size, const std::string& group) {
  sh::ModelDesc m;
  m.path = path;
  m.engine = engine;
  m.tp_rank = tp_rank;
  m.tp_size = tp_size;
  m.group = group;
  m.config = json::parse(config_json, "model config");
  return m;
}

}  // namespace

void init_sharing(nb::module_& m) {
  m.attr("MANIFEST_VERSION") = sh::kManifestVersion;
  // Tensors handed to torch keep Export/Attachment objects alive, and torch may free them after this
  // module at interpreter exit; nanobind would report that as a leak although nothing is lost (segments
  // are unlinked by an atexit hook in livetrain/sharing.py, mappings vanish with the process).
  nb::set_leak_warnings(false);

  nb::class_<sh::Export>(m, "Export",
                         "What an engine shares: shared-memory segments it owns (unlinked when this object "
                         "is destroyed) and CUDA allocations, with tensors inside them.")
      .def(nb::init<>())
      .def("add_shm", &sh::Export::add_shm, nb::arg("size"), nb::arg("name") = "",
           "Create a POSIX shared-memory segment of `size` bytes; returns its buffer index.")
      .def(
          "shm_name", [](const sh::Export& e, uint32_t buffer) { return e.shm(buffer).name(); }, nb::arg("buffer"))
      .def(
          "shm_tensor",
          [](nb::handle self, uint32_t buffer) {
            const sh::ShmSegment& s = nb::cast<const sh::Export&>(self).shm(buffer);
            size_t shape[1] = {static_cast<size_t>(s.size())};
            // The Export (self) owns the segment; the tensor holds a reference to it.
            return Tensor(s.data(), 1, shape, self, nullptr, nb::dtype<uint8_t>(), nb::device::cpu::value, 0);
          },
          nb::arg("buffer"), "The whole segment as a writable uint8 torch tensor (keeps this Export alive).")
      .def(
          "add_tensor",
          [](sh::Export& e, const std::string& name, const std::string& dtype, std::vector<uint64_t> shape,
             std::vector<uint64_t> strides, uint32_t buffer, uint64_t offset) {
            e.add_tensor(sh::TensorDesc{name, parse_dtype(dtype, "tensor \"" + name + "\""), std::move(shape),
                                        std::move(strides), buffer, offset});
          },
          nb::arg("name"), nb::arg("dtype"), nb::arg("shape"), nb::arg("strides"), nb::arg("buffer"), nb::arg("offset"))
      .def(
          "add_cuda_tensor",
          [](sh::Export& e, const std::string& name, const std::string& dtype, std::vector<uint64_t> shape,
             std::vector<uint64_t> strides, uint64_t device_ptr) {
            e.add_cuda_tensor(name, parse_dtype(dtype, "tensor \"" + name + "\""), std::move(shape), std::move(strides),
                              device_ptr);
          },
          nb::arg("name"), nb::arg("dtype"), nb::arg("shape"), nb::arg("strides"), nb::arg("device_ptr"),
          "Record a CUDA tensor by device pointer (strides in elements); its allocation is exported once.")
      .def(
          "write_manifest",
          [](const sh::Export& e, const std::string& path, const std::string& model_path,
             const std::string& config_json, const std::string& engine, uint32_t tp_rank, uint32_t tp_size,
             const std::string& group) {
            e.write_manifest(path, model_desc(model_path, config_json, engine, tp_rank, tp_size, group));
          },
          nb::arg("path"), nb::arg("model_path"), nb::arg("config_json"), nb::arg("engine"), nb::arg("tp_rank") = 0,
          nb::arg("tp_size") = 1, nb::arg("group") = "",
          "Write the manifest (atomically, mode 0600) naming this process as the owner; `group` names the "
          "engine's ranks at tensor-parallel size > 1.")
      .def("unlink_segments", &sh::Export::unlink_segments,
           "Remove the segments' names now; mappings (the engine's and attached trainers') stay valid.")
      .def_prop_ro("num_buffers", [](const sh::Export& e) { return e.buffers().size(); })
      .def_prop_ro("num_tensors", [](const sh::Export& e) { return e.tensors().size(); });

  nb::class_<sh::Attachment>(m, "Attachment", "An attached manifest: lease, mappings and tensor views.")
      .def_static(
          "open",
          [](const std::string& path, bool check_owner, bool take_lease, std::optional<uint32_t> owner_uid) {
            nb::gil_scoped_release release;
            return sh::Attachment::open(path, sh::AttachOptions{check_owner, take_lease, owner_uid});
          },
          nb::arg("path"), nb::arg("check_owner") = true, nb::arg("take_lease") = true,
          nb::arg("owner_uid") = nb::none())
      .def_prop_ro("path", &sh::Attachment::path)
      .def_prop_ro("lease_held", &sh::Attachment::lease_held)
      .def("release_lease", &sh::Attachment::release_lease)
      .def(
          "buffers",
          [](const sh::Attachment& a) {
            nb::list out;
            for (const sh::BufferView& b : a.buffers()) {
              out.append(nb::make_tuple(reinterpret_cast<uintptr_t>(b.data), b.size, b.device));
            }
            return out;
          },
          "(address, size, device) of every opened buffer, in manifest order; device -1 is host memory.")
      .def("manifest_json", [](const sh::Attachment& a) { return sh::manifest_serialize(a.manifest()); })
      .def(
          "tensors",
          [](std::shared_ptr<sh::Attachment> a) {
            nb::list out;
            for (const sh::TensorView& v : a->views()) {
              const sh::TensorDesc& t = *v.desc;
              std::vector<size_t> shape(t.shape.begin(), t.shape.end());
              std::vector<int64_t> strides(t.strides.begin(), t.strides.end());
              auto* keep = new std::shared_ptr<sh::Attachment>(a);
              nb::capsule owner(keep,
                                [](void* p) noexcept { delete static_cast<std::shared_ptr<sh::Attachment>*>(p); });
              int device_type = v.device < 0 ? nb::device::cpu::value : nb::device::cuda::value;
              Tensor arr(v.data, shape.size(), shape.data(), owner, strides.data(), dlpack_dtype(t.dtype), device_type,
                         v.device < 0 ? 0 : v.device);
              out.append(nb::make_tuple(t.name, std::string(dtype_name(t.dtype)), nb::cast(arr)));
            }
            return out;
          },
          "(name, dtype name, torch tensor) for every tensor, in manifest order; no copy.");

  m.def(
      "manifest_read", [](const std::string& path) { return sh::manifest_serialize(sh::manifest_read(path)); },
      nb::arg("path"), "Parse and validate a manifest; returns its canonical JSON text.");
  m.def(
      "manifest_owner_state",
      [](const std::string& path) {
        sh::Manifest mf = sh::manifest_read(path);
        std::string detail;
        sh::OwnerState s = sh::owner_state(mf.owner, &detail);
        return nb::make_tuple(s == sh::OwnerState::kAlive, detail);
      },
      nb::arg("path"), "(alive, why not) for the owner of a manifest.");
  m.def("lease_holder", &sh::lease_holder, nb::arg("manifest_path"));
}

}  // namespace livetrain::bindings
