// Bindings: the checkpoint store (create/open, save, list, restore, compare, verify, materialize, gc).
// Tensors cross as (name, dtype name, shape, address of contiguous host memory); python/livetrain/
// checkpoint.py owns the torch tensors and checks device, contiguity, dtype and shape before calling.
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/error.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace {

// (name, dtype name, shape, data address, device: -1 host memory, else the CUDA ordinal)
using TensorArg = std::tuple<std::string, std::string, std::vector<uint64_t>, uintptr_t, int>;

std::vector<checkpoint::LiveTensor> live_tensors(const std::vector<TensorArg>& args) {
  std::vector<checkpoint::LiveTensor> out;
  out.reserve(args.size());
  for (const auto& [name, dtype, shape, ptr, device] : args) {
    out.push_back(checkpoint::LiveTensor{name, parse_dtype(dtype, "tensor \"" + name + "\""), shape,
                                   reinterpret_cast<void*>(ptr), device});
  }
  return out;
}

nb::dict generation_dict(const checkpoint::Generation& g) {
  nb::dict d;
  d["generation"] = g.generation;
  d["parent"] = g.parent;
  d["time_ms"] = g.time_ms;
  d["weight_version"] = g.weight_version;
  d["delta"] = g.delta;
  d["bytes"] = g.bytes;
  d["changed"] = g.changed;
  d["delta_hash"] = checkpoint::hash_hex(g.delta_hash);
  d["optimizer_state"] = g.optimizer_state;
  return d;
}

}  // namespace

void init_checkpoint(nb::module_& m) {
  nb::class_<checkpoint::Store>(m, "CheckpointStore",
                          "The delta checkpoint store of a model directory (docs/checkpoint.md). Holds the store's "
                          "lock and a host copy of the head generation until close().")
      .def_static(
          "create",
          [](const std::string& model_dir, const std::string& store_dir) {
            nb::gil_scoped_release release;
            return checkpoint::Store::create(model_dir, store_dir);
          },
          nb::arg("model_dir"), nb::arg("store_dir") = "")
      .def_static(
          "open",
          [](const std::string& model_dir, const std::string& store_dir) {
            nb::gil_scoped_release release;
            return checkpoint::Store::open(model_dir, store_dir);
          },
          nb::arg("model_dir"), nb::arg("store_dir") = "")
      .def("close", &checkpoint::Store::close)
      .def_prop_ro("dir", &checkpoint::Store::dir)
      .def_prop_ro("model_dir", &checkpoint::Store::model_dir)
      .def_prop_ro("head", [](const checkpoint::Store& s) { return s.commit().head; })
      .def_prop_ro("oldest", [](const checkpoint::Store& s) { return s.commit().oldest; })
      .def_prop_ro("materialized", [](const checkpoint::Store& s) { return s.commit().materialized; })
      .def(
          "tensors",
          [](const checkpoint::Store& s) {
            std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>> out;
            for (const auto& t : s.commit().tensors) out.emplace_back(t.name, std::string(dtype_name(t.dtype)), t.shape);
            return out;
          },
          "(name, dtype, shape) of every tensor, in the store's order.")
      .def(
          "generations",
          [](const checkpoint::Store& s) {
            nb::list out;
            for (const auto& g : s.commit().generations) out.append(generation_dict(g));
            return out;
          },
          "The committed generations, oldest first, as dicts.")
      .def(
          "save",
          [](checkpoint::Store& s, const std::vector<TensorArg>& tensors, uint64_t weight_version,
             const std::string& optimizer_state, bool save_if_unchanged) {
            std::vector<checkpoint::LiveTensor> live = live_tensors(tensors);
            checkpoint::SaveOptions o;
            o.weight_version = weight_version;
            o.optimizer_state = optimizer_state;
            o.save_if_unchanged = save_if_unchanged;
            checkpoint::SaveResult r;
            {
              nb::gil_scoped_release release;
              r = s.save(live, o);
            }
            nb::dict d;
            d["written"] = r.written;
            d["generation"] = r.generation;
            d["bytes"] = r.bytes;
            d["changed"] = r.changed;
            d["elements"] = r.elements;
            d["model_bytes"] = r.model_bytes;
            d["diff_seconds"] = r.diff_seconds;
            d["encode_seconds"] = r.encode_seconds;
            d["write_seconds"] = r.write_seconds;
            return d;
          },
          nb::arg("tensors"), nb::arg("weight_version") = 0, nb::arg("optimizer_state") = "",
          nb::arg("save_if_unchanged") = false)
      .def(
          "restore_live",
          [](checkpoint::Store& s, uint64_t generation, const std::vector<TensorArg>& tensors) {
            std::vector<checkpoint::LiveTensor> live = live_tensors(tensors);
            nb::gil_scoped_release release;
            s.restore_live(generation, live);
          },
          nb::arg("generation"), nb::arg("tensors"))
      .def(
          "restore_to_dir",
          [](checkpoint::Store& s, uint64_t generation, const std::string& out_dir) {
            nb::gil_scoped_release release;
            s.restore_to_dir(generation, out_dir);
          },
          nb::arg("generation"), nb::arg("out_dir"))
      .def(
          "compare_live",
          [](checkpoint::Store& s, uint64_t generation, const std::vector<TensorArg>& tensors) {
            std::vector<checkpoint::LiveTensor> live = live_tensors(tensors);
            checkpoint::LiveDiff r;
            {
              nb::gil_scoped_release release;
              r = s.compare_live(generation, live);
            }
            nb::dict d;
            d["tensors"] = r.tensors;
            d["elements"] = r.elements;
            d["first"] = r.first;
            return d;
          },
          nb::arg("generation"), nb::arg("tensors"))
      .def(
          "verify",
          [](checkpoint::Store& s) {
            nb::gil_scoped_release release;
            return s.verify();
          },
          "Checks deltas and model files; returns the problems found (empty when all is well).")
      .def(
          "materialize",
          [](checkpoint::Store& s, uint64_t generation, bool copy_symlinks) {
            nb::gil_scoped_release release;
            s.materialize(generation, copy_symlinks);
          },
          nb::arg("generation"), nb::arg("copy_symlinks") = false)
      .def(
          "gc",
          [](checkpoint::Store& s, uint64_t keep_from) {
            nb::gil_scoped_release release;
            s.gc(keep_from);
          },
          nb::arg("keep_from"));
}

}  // namespace livetrain::bindings
