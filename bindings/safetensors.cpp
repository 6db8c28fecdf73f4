// Bindings: safetensors files and model directories. Tensors cross as raw little-endian bytes (uint8
// arrays) plus dtype name and shape; the Python side (livetrain/safetensors.py) turns them into torch
// tensors, so the core never depends on torch.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "bindings.hpp"
#include "livetrain/error.hpp"
#include "livetrain/safetensors.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace st = livetrain::safetensors;

namespace {

using Bytes = nb::ndarray<nb::numpy, const uint8_t, nb::ndim<1>>;
using InBytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

nb::dict tensor_info(const st::TensorInfo& t, uint64_t data_start) {
  nb::dict d;
  d["name"] = t.name;
  d["dtype"] = std::string(dtype_name(t.dtype));
  d["shape"] = nb::tuple(nb::cast(t.shape));
  d["offset"] = data_start + t.begin;
  d["nbytes"] = t.nbytes();
  return d;
}

nb::object metadata_dict(const std::optional<st::Metadata>& md) {
  if (!md) return nb::none();
  nb::dict d;
  for (const auto& [k, v] : *md) d[nb::str(k.c_str(), k.size())] = nb::str(v.c_str(), v.size());
  return d;
}

// A read-only uint8 view of bytes inside a mapping; `owner` keeps the mapping alive.
template <typename Owner>
Bytes view(const std::shared_ptr<Owner>& owner, const uint8_t* data, size_t size) {
  auto* keep = new std::shared_ptr<Owner>(owner);
  nb::capsule cap(keep, [](void* p) noexcept { delete static_cast<std::shared_ptr<Owner>*>(p); });
  size_t shape[1] = {size};
  return Bytes(data, 1, shape, cap);
}

struct PyTensor {
  std::string name;
  std::string dtype;
  std::vector<uint64_t> shape;
  InBytes data;
};

std::vector<st::TensorRef> to_refs(const std::vector<PyTensor>& tensors) {
  std::vector<st::TensorRef> refs;
  refs.reserve(tensors.size());
  for (const PyTensor& t : tensors) {
    refs.push_back(st::TensorRef{t.name, parse_dtype(t.dtype, "tensor \"" + t.name + "\""), t.shape, t.data.data(),
                                 static_cast<uint64_t>(t.data.size())});
  }
  return refs;
}

st::WriteOptions options(std::optional<st::Metadata> metadata, uint64_t alignment) {
  st::WriteOptions o;
  o.metadata = std::move(metadata);
  o.data_alignment = alignment;
  return o;
}

std::vector<PyTensor> from_tuples(
    const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>, InBytes>>& in) {
  std::vector<PyTensor> out;
  out.reserve(in.size());
  for (const auto& [name, dtype, shape, data] : in) out.push_back(PyTensor{name, dtype, shape, data});
  return out;
}

// File.open and Model.open, without the GIL; shared, so that arrays viewing the mapping keep it alive.
template <typename T>
std::shared_ptr<T> open_shared(const std::string& path) {
  nb::gil_scoped_release release;
  return std::make_shared<T>(T::open(path));
}

}  // namespace

void init_safetensors(nb::module_& m) {
  nb::class_<st::File>(m, "SafetensorsFile", "A validated, memory-mapped safetensors file.")
      .def_static("open", &open_shared<st::File>, nb::arg("path"))
      .def_prop_ro("path", &st::File::path)
      .def_prop_ro("file_size", &st::File::file_size)
      .def_prop_ro("metadata", [](const st::File& f) { return metadata_dict(f.header().metadata); })
      .def(
          "tensors",
          [](const st::File& f) {
            nb::list out;
            for (const auto& t : f.tensors()) out.append(tensor_info(t, f.header().data_start()));
            return out;
          },
          "Tensor descriptions (name, dtype, shape, offset in the file, nbytes) in file order.")
      .def(
          "buffer",
          [](std::shared_ptr<st::File> f, const std::string& name) {
            const st::TensorInfo& t = f->tensor(name);
            return view(f, f->data(t), t.nbytes());
          },
          nb::arg("name"), "The tensor's bytes as a read-only uint8 array sharing the file mapping.");

  nb::class_<st::Model>(m, "Model", "A safetensors file or model directory (single file or sharded).")
      .def_static("open", &open_shared<st::Model>, nb::arg("path"))
      .def_prop_ro("path", &st::Model::path)
      .def_prop_ro("sharded", &st::Model::sharded)
      .def_prop_ro("total_bytes", &st::Model::total_bytes)
      .def("files",
           [](const st::Model& mdl) {
             std::vector<std::string> out;
             for (const auto& s : mdl.shards()) out.push_back(s->path());
             return out;
           })
      .def("names", &st::Model::names)
      .def("__len__", &st::Model::size)
      .def("__contains__", [](const st::Model& mdl, const std::string& n) { return mdl.find(n) != nullptr; })
      .def(
          "info",
          [](const st::Model& mdl, const std::string& name) {
            const auto& e = mdl.tensor(name);
            nb::dict d = tensor_info(*e.info, e.file->header().data_start());
            d["file"] = e.file->path();
            return d;
          },
          nb::arg("name"))
      .def(
          "buffer",
          [](std::shared_ptr<st::Model> mdl, const std::string& name) {
            const auto& e = mdl->tensor(name);
            return view(mdl, e.file->data(*e.info), e.info->nbytes());
          },
          nb::arg("name"), "The tensor's bytes as a read-only uint8 array sharing the file mapping.");

  m.def(
      "safetensors_write",
      [](const std::string& path,
         const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>, InBytes>>& tensors,
         std::optional<st::Metadata> metadata, uint64_t alignment) {
        auto py = from_tuples(tensors);
        auto refs = to_refs(py);
        auto o = options(std::move(metadata), alignment);
        nb::gil_scoped_release release;
        st::write_file(path, refs, o);
      },
      nb::arg("path"), nb::arg("tensors"), nb::arg("metadata").none(), nb::arg("alignment") = 8,
      "Write (name, dtype, shape, uint8 bytes) tuples as one safetensors file, atomically.");

  m.def(
      "safetensors_write_model",
      [](const std::string& dir,
         const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>, InBytes>>& tensors,
         uint64_t max_shard_bytes, std::optional<st::Metadata> metadata, uint64_t alignment) {
        auto py = from_tuples(tensors);
        auto refs = to_refs(py);
        auto o = options(std::move(metadata), alignment);
        nb::gil_scoped_release release;
        return st::write_model(dir, refs, max_shard_bytes, o);
      },
      nb::arg("dir"), nb::arg("tensors"), nb::arg("max_shard_bytes"), nb::arg("metadata").none(),
      nb::arg("alignment") = 8,
      "Write a model directory (one file, or shards plus model.safetensors.index.json); returns file names.");
}

}  // namespace livetrain::bindings
