// Bindings: the checkpoint store (create/open, save, save_part/commit_parts/refresh, list, restore, compare,
// verify, materialize, gc).
// Tensors cross as (name, dtype name, shape, address of contiguous host memory); python/livetrain/
// checkpoint.py owns the torch tensors and checks device, contiguity, dtype and shape before calling.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/error.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace {

// (name, dtype name, shape, data address, device: -1 host memory, else the CUDA ordinal, region start:
// empty for the whole tensor, else where the region of `shape` starts along every dim)
using TensorArg = std::tuple<std::string, std::string, std::vector<uint64_t>, uintptr_t, int, std::vector<uint64_t>>;
// (name, region start, region shape); empty lists: the whole tensor
using HeldArg = std::tuple<std::string, std::vector<uint64_t>, std::vector<uint64_t>>;

std::vector<checkpoint::LiveTensor> live_tensors(const std::vector<TensorArg>& args) {
  std::vector<checkpoint::LiveTensor> out;
  out.reserve(args.size());
  for (const auto& [name, dtype, shape, ptr, device, start] : args) {
    out.push_back(checkpoint::LiveTensor{name, parse_dtype(dtype, "tensor \"" + name + "\""), shape,
                                         reinterpret_cast<void*>(ptr), device, start});
  }
  return out;
}

using ServedArg = std::vector<std::pair<std::string, std::string>>;  // (name, dtype name)

std::vector<std::pair<std::string, DType>> served_dtypes(const ServedArg& served) {
  std::vector<std::pair<std::string, DType>> v;
  for (const auto& [name, dtype] : served) v.emplace_back(name, parse_dtype(dtype, "served tensor \"" + name + "\""));
  return v;
}

checkpoint::OpenOptions open_options(uint32_t rank, uint32_t ranks, const std::optional<std::vector<HeldArg>>& held,
                                     const std::string& group, const ServedArg& served) {
  checkpoint::OpenOptions o;
  o.rank = rank;
  o.ranks = ranks;
  o.group = group;
  o.served = served_dtypes(served);
  if (held) {
    o.held.emplace();
    for (const auto& [name, start, shape] : *held) o.held->push_back(checkpoint::HeldRegion{name, {start, shape}});
  }
  return o;
}

nb::object hash_or_none(const std::optional<uint64_t>& h) {
  return h ? nb::cast(checkpoint::hash_hex(*h)) : nb::none();
}

// A part of a generation, as COMMIT records it (None for what a version-1 COMMIT did not record).
nb::dict part_dict(const checkpoint::Part& p) {
  nb::dict q;
  q["rank"] = p.rank;
  q["file"] = p.file;
  q["bytes"] = p.bytes ? nb::cast(*p.bytes) : nb::none();
  q["hash"] = checkpoint::hash_hex(p.hash);
  q["changed"] = p.changed;
  q["optimizer_state"] = p.optimizer_state;
  q["optimizer_bytes"] = p.optimizer_bytes ? nb::cast(*p.optimizer_bytes) : nb::none();
  q["optimizer_hash"] = hash_or_none(p.optimizer_hash);
  return q;
}

nb::dict generation_dict(const checkpoint::Generation& g) {
  nb::dict d;
  d["generation"] = g.generation;
  d["parent"] = g.parent;
  d["time_ms"] = g.time_ms;
  d["weight_version"] = g.weight_version;
  d["bytes"] = g.bytes;
  d["changed"] = g.changed;
  d["ranks"] = g.ranks;
  nb::list parts;
  for (const auto& p : g.parts) parts.append(part_dict(p));
  d["parts"] = parts;
  // A single-process generation's files, as before generations had parts ("" when none).
  const checkpoint::Part* p0 = g.ranks == 1 ? g.part(0) : nullptr;
  d["delta"] = p0 ? p0->file : std::string();
  d["optimizer_state"] = p0 ? p0->optimizer_state : std::string();
  return d;
}

nb::dict usage_dict(const Usage& u) {
  nb::dict d;
  Usage::each_field([&](const char* key, auto field) { d[key] = u.*field; });
  return d;
}

// A save's SaveUsage: {"encode_wait_seconds", "encode": {...}, "process": {...}}.
nb::dict save_usage_dict(const checkpoint::SaveUsage& u) {
  nb::dict d;
  d["encode_wait_seconds"] = u.encode_wait_seconds;
  d["encode"] = usage_dict(u.encode);
  d["process"] = usage_dict(u.process);
  return d;
}

// save_part's descriptor: the part's fields, and the generation, TP size, group and timings.
nb::dict descriptor_dict(const checkpoint::PartDescriptor& p) {
  nb::dict d = part_dict(p.part);
  d["generation"] = p.generation;
  d["parent"] = p.parent;
  d["ranks"] = p.ranks;
  d["group"] = p.group;
  d["elements"] = p.elements;
  d["model_bytes"] = p.model_bytes;
  d["diff_seconds"] = p.diff_seconds;
  d["encode_seconds"] = p.encode_seconds;
  d["write_seconds"] = p.write_seconds;
  d["sync_seconds"] = p.sync_seconds;
  d["usage"] = save_usage_dict(p.usage);
  nb::list served;
  for (const auto& [name, dtype] : p.served) served.append(nb::make_tuple(name, std::string(dtype_name(dtype))));
  d["served"] = served;
  return d;
}

// A descriptor back from the dict save_part returned (gathered from another rank's process).
checkpoint::PartDescriptor descriptor_from(const nb::handle& obj, size_t i) {
  const std::string what = "parts[" + std::to_string(i) + "]";
  if (!nb::isinstance<nb::dict>(obj))
    throw Error(ErrorCode::kInvalidArg, what + ": expected the dict save_part returned");
  nb::dict d = nb::borrow<nb::dict>(obj);
  auto field = [&](const char* key) -> nb::handle {
    if (!d.contains(key)) throw Error(ErrorCode::kInvalidArg, what + ": missing \"" + key + "\"");
    return d[key];
  };
  auto u64 = [&](const char* key) {
    try {
      return nb::cast<uint64_t>(field(key));
    } catch (const nb::cast_error&) {
      throw Error(ErrorCode::kInvalidArg, what + "." + key + ": expected a non-negative integer");
    }
  };
  auto text = [&](const char* key) {
    try {
      return nb::cast<std::string>(field(key));
    } catch (const nb::cast_error&) {
      throw Error(ErrorCode::kInvalidArg, what + "." + key + ": expected a string");
    }
  };
  auto hash = [&](const char* key) {
    auto h = checkpoint::hash_from_hex(text(key));
    if (!h) throw Error(ErrorCode::kInvalidArg, what + "." + key + ": expected 16 lowercase hex digits");
    return *h;
  };
  checkpoint::PartDescriptor p;
  p.generation = u64("generation");
  p.parent = u64("parent");
  p.ranks = static_cast<uint32_t>(u64("ranks"));
  p.group = text("group");
  p.elements = u64("elements");
  p.model_bytes = u64("model_bytes");
  checkpoint::Part& part = p.part;
  part.rank = static_cast<uint32_t>(u64("rank"));
  part.file = text("file");
  part.bytes = u64("bytes");
  part.hash = hash("hash");
  part.changed = u64("changed");
  part.optimizer_state = text("optimizer_state");
  if (!part.optimizer_state.empty()) {
    part.optimizer_bytes = u64("optimizer_bytes");
    part.optimizer_hash = hash("optimizer_hash");
  }
  // The timings and usage (informational: commit_parts sums them into the generation's answer); optional, so
  // that a descriptor from an older build still commits.
  auto number = [&](const nb::dict& from, const char* key, const std::string& where, auto& out) {
    if (!from.contains(key)) return;
    try {
      out = nb::cast<std::remove_reference_t<decltype(out)>>(from[key]);
    } catch (const nb::cast_error&) {
      throw Error(ErrorCode::kInvalidArg, where + "." + key + ": expected a number");
    }
  };
  number(d, "diff_seconds", what, p.diff_seconds);
  number(d, "encode_seconds", what, p.encode_seconds);
  number(d, "write_seconds", what, p.write_seconds);
  number(d, "sync_seconds", what, p.sync_seconds);
  if (d.contains("usage")) {
    if (!nb::isinstance<nb::dict>(d["usage"])) throw Error(ErrorCode::kInvalidArg, what + ".usage: expected a dict");
    nb::dict u = nb::borrow<nb::dict>(d["usage"]);
    number(u, "encode_wait_seconds", what + ".usage", p.usage.encode_wait_seconds);
    for (auto [key, into] :
         {std::pair<const char*, Usage*>{"encode", &p.usage.encode}, {"process", &p.usage.process}}) {
      if (!u.contains(key)) continue;
      if (!nb::isinstance<nb::dict>(u[key]))
        throw Error(ErrorCode::kInvalidArg, what + ".usage." + key + ": expected a dict");
      nb::dict x = nb::borrow<nb::dict>(u[key]);
      const std::string where = what + ".usage." + key;
      Usage::each_field([&](const char* field, auto member) { number(x, field, where, into->*member); });
    }
  }
  if (d.contains("served")) {  // absent in a descriptor of a rank that serves every tensor in the files' dtype
    try {
      p.served = served_dtypes(nb::cast<ServedArg>(d["served"]));
    } catch (const nb::cast_error&) {
      throw Error(ErrorCode::kInvalidArg, what + ".served: expected a list of (tensor name, dtype name)");
    }
  }
  return p;
}

nb::dict save_result_dict(const checkpoint::SaveResult& r) {
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
  d["sync_seconds"] = r.sync_seconds;
  d["usage"] = save_usage_dict(r.usage);
  return d;
}

using StoreFactory = checkpoint::Store (*)(const std::string&, const std::string&, const checkpoint::OpenOptions&);

// CheckpointStore.create and .open: Store::create or Store::open (`make`) with the options of Python's
// arguments, without the GIL.
template <StoreFactory make>
void def_store_factory(nb::class_<checkpoint::Store>& c, const char* name, const char* doc) {
  c.def_static(
      name,
      [](const std::string& model_dir, const std::string& store_dir, uint32_t rank, uint32_t ranks,
         std::optional<std::vector<HeldArg>> held, const std::string& group, const ServedArg& served) {
        checkpoint::OpenOptions o = open_options(rank, ranks, held, group, served);
        nb::gil_scoped_release release;
        return make(model_dir, store_dir, o);
      },
      nb::arg("model_dir"), nb::arg("store_dir") = "", nb::arg("rank") = 0, nb::arg("ranks") = 1,
      nb::arg("held") = nb::none(), nb::arg("group") = "", nb::arg("served") = ServedArg{}, doc);
}

}  // namespace

void init_checkpoint(nb::module_& m) {
  nb::class_<checkpoint::Store> store(m, "CheckpointStore",
                                      "The delta checkpoint store of a model directory (docs/checkpoint.md). Holds "
                                      "the store's lock and a host copy of the head generation until close().");
  def_store_factory<&checkpoint::Store::create>(
      store, "create", "Creates a store (generation 0 = the model files), then opens it as open() does.");
  def_store_factory<&checkpoint::Store::open>(
      store, "open",
      "Opens a store; `held`: (name, start, shape) regions to keep a head copy of (None: every tensor whole, "
      "[]: none); `served`: (name, dtype) of tensors this process serves in another dtype than the files'.");
  store
      .def(
          "close",
          [](checkpoint::Store& s) {
            nb::gil_scoped_release release;  // waits for prepare_gpu's thread: seconds at 27B
            s.close();
          },
          "Closes the store (waits for a prepare_gpu still page-locking).")
      .def(
          "discard_new",
          [](checkpoint::Store& s, bool remove_dir) {
            nb::gil_scoped_release release;  // it closes: waits for prepare_gpu's thread as close does
            s.discard_new(remove_dir);
          },
          nb::arg("remove_dir"),
          "Removes a store that holds nothing but generation 0 (what a failed first save leaves): COMMIT, its LOCK "
          "and, with remove_dir, the directory when nothing else is in it; then closes it.")
      .def("prepare_gpu", &checkpoint::Store::prepare_gpu, nb::arg("device"),
           "Page-locks the head copy for saves from CUDA device `device`, in registrations of whole tensors, on a "
           "thread of its own; returns at once, a save waits for it.")
      .def_prop_ro("gpu_prepared", &checkpoint::Store::gpu_prepared,
                   "Whether nothing of prepare_gpu's is left running.")
      .def_prop_ro("dir", &checkpoint::Store::dir)
      .def_prop_ro("model_dir", &checkpoint::Store::model_dir)
      .def_prop_ro("head", [](const checkpoint::Store& s) { return s.commit().head; })
      .def_prop_ro("oldest", [](const checkpoint::Store& s) { return s.commit().oldest; })
      .def_prop_ro("materialized", [](const checkpoint::Store& s) { return s.commit().materialized; })
      .def(
          "tensors",
          [](const checkpoint::Store& s) {
            std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>, std::string, std::string>> out;
            for (size_t i = 0; i < s.commit().tensors.size(); ++i) {
              const auto& t = s.commit().tensors[i];
              out.emplace_back(t.name, std::string(dtype_name(t.dtype)), t.shape, std::string(dtype_name(s.served(i))),
                               std::string(dtype_name(t.served)));
            }
            return out;
          },
          "(name, dtype in the model files, shape, dtype this process serves it in, dtype COMMIT records) of "
          "every tensor, in the store's order.")
      .def(
          "generations",
          [](const checkpoint::Store& s) {
            nb::list out;
            for (const auto& g : s.commit().generations) out.append(generation_dict(g));
            return out;
          },
          "The committed generations, oldest first, as dicts.")
      .def_prop_ro("rank", &checkpoint::Store::rank)
      .def_prop_ro("ranks", &checkpoint::Store::ranks)
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
            return save_result_dict(r);
          },
          nb::arg("tensors"), nb::arg("weight_version") = 0, nb::arg("optimizer_state") = "",
          nb::arg("save_if_unchanged") = false)
      .def(
          "save_part",
          [](checkpoint::Store& s, const std::vector<TensorArg>& tensors, const std::string& optimizer_state) {
            std::vector<checkpoint::LiveTensor> live = live_tensors(tensors);
            checkpoint::SaveOptions o;
            o.optimizer_state = optimizer_state;
            checkpoint::PartDescriptor d;
            {
              nb::gil_scoped_release release;
              d = s.save_part(live, o);
            }
            return descriptor_dict(d);
          },
          nb::arg("tensors"), nb::arg("optimizer_state") = "",
          "Writes this rank's part of the next generation; returns its descriptor (a dict) for commit_parts.")
      .def(
          "commit_parts",
          [](checkpoint::Store& s, const nb::list& parts, uint64_t weight_version, bool save_if_unchanged) {
            std::vector<checkpoint::PartDescriptor> ps;
            for (size_t i = 0; i < parts.size(); ++i) ps.push_back(descriptor_from(parts[i], i));
            checkpoint::SaveResult r;
            {
              nb::gil_scoped_release release;
              r = s.commit_parts(ps, weight_version, save_if_unchanged);
            }
            return save_result_dict(r);
          },
          nb::arg("parts"), nb::arg("weight_version") = 0, nb::arg("save_if_unchanged") = false,
          "Rank 0: checks every rank's part and commits them as the next generation.")
      .def(
          "refresh",
          [](checkpoint::Store& s) {
            nb::gil_scoped_release release;
            return s.refresh();
          },
          "Confirms or puts back this rank's pending part against COMMIT; returns the head.")
      .def(
          "restore_live",
          [](checkpoint::Store& s, uint64_t generation, const std::vector<TensorArg>& tensors) {
            std::vector<checkpoint::LiveTensor> live = live_tensors(tensors);
            nb::gil_scoped_release release;
            s.restore_live(generation, live);
          },
          nb::arg("generation"), nb::arg("tensors"))
      .def(
          "check_restore",
          [](checkpoint::Store& s, uint64_t generation, const std::vector<TensorArg>& tensors) {
            std::vector<checkpoint::LiveTensor> live = live_tensors(tensors);
            nb::gil_scoped_release release;
            s.check_restore(generation, live);
          },
          nb::arg("generation"), nb::arg("tensors"),
          "Checks what restore_live and the generation's optimizer state would read; writes nothing.")
      .def(
          "restore_to_dir",
          [](checkpoint::Store& s, uint64_t generation, const std::string& out_dir) {
            nb::gil_scoped_release release;
            return s.restore_to_dir(generation, out_dir);
          },
          nb::arg("generation"), nb::arg("out_dir"))
      .def(
          "serve_as", [](checkpoint::Store& s, const ServedArg& served) { s.serve_as(served_dtypes(served)); },
          nb::arg("served"), "Declares the dtypes this process serves tensors in (nothing is written).")
      .def(
          "set_served",
          [](checkpoint::Store& s, const ServedArg& served) {
            auto v = served_dtypes(served);
            nb::gil_scoped_release release;
            s.set_served(v);
          },
          nb::arg("served"))
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
          [](checkpoint::Store& s, uint64_t generation, bool copy_symlinks, bool round_to_file_dtype) {
            nb::gil_scoped_release release;
            return s.materialize(generation, copy_symlinks, {}, round_to_file_dtype);
          },
          nb::arg("generation"), nb::arg("copy_symlinks") = false, nb::arg("round_to_file_dtype") = false,
          "Brings the model files to `generation`; returns the tensors written in their served dtype (files "
          "rewritten: their values do not fit the files' dtype), or, with round_to_file_dtype, the tensors "
          "rounded to the files' dtype (saved as a new generation first, then materialized).")
      .def(
          "gc",
          [](checkpoint::Store& s, uint64_t keep_from, bool copy_symlinks) {
            nb::gil_scoped_release release;
            s.gc(keep_from, {}, copy_symlinks);
          },
          nb::arg("keep_from"), nb::arg("copy_symlinks") = false);
}

}  // namespace livetrain::bindings
