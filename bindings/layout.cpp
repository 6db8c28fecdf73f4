// Bindings: engine <-> HF layouts. The config crosses as JSON text and results as plain dicts and tuples;
// livetrain/layout.py applies the views to torch tensors.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "livetrain/error.hpp"
#include "livetrain/json.hpp"
#include "livetrain/layout.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace {

namespace lo = livetrain::layout;

lo::Options options(const std::string& engine, uint32_t tp_rank, uint32_t tp_size, uint64_t vocab_padding,
                    const std::optional<std::tuple<std::string, std::string>>& prefixes) {
  lo::Options o;
  o.engine = lo::engine_from_name(engine);
  o.tp_rank = tp_rank;
  o.tp_size = tp_size;
  o.vocab_padding = vocab_padding;
  if (prefixes) o.engine_prefixes = lo::Prefixes{std::get<0>(*prefixes), std::get<1>(*prefixes)};
  return o;
}

nb::tuple shape_tuple(const std::vector<uint64_t>& v) { return nb::tuple(nb::cast(v)); }

nb::dict info_dict(const lo::ModelInfo& m) {
  nb::dict d;
  d["family"] = m.family;
  d["model_type"] = m.model_type;
  d["multimodal"] = m.multimodal;
  d["num_layers"] = m.num_layers;
  d["vocab_size"] = m.vocab_size;
  d["tied_embeddings"] = m.tied_embeddings;
  d["layer_types"] = nb::cast(m.layer_types);
  // The sizes a tensor-parallel rank divides (livetrain.tensor_parallel.rank_config), with the config's defaults
  // applied.
  d["hidden_size"] = m.hidden_size;
  d["intermediate_size"] = m.intermediate_size;
  d["num_heads"] = m.num_heads;
  d["num_kv_heads"] = m.num_kv_heads;
  d["head_dim"] = m.head_dim;
  d["linear_num_key_heads"] = m.linear_num_key_heads;
  d["linear_num_value_heads"] = m.linear_num_value_heads;
  return d;
}

nb::dict view_dict(const lo::View& v) {
  nb::dict d;
  d["hf_name"] = v.hf_name;
  d["engine_name"] = v.engine_name;
  d["dtype"] = std::string(dtype_name(v.dtype));
  d["offset"] = v.offset;
  d["shape"] = shape_tuple(v.shape);
  d["strides"] = shape_tuple(v.strides);
  d["hf_shape"] = shape_tuple(v.hf_shape);
  if (v.shard.replicated) {
    d["shard"] = nb::none();
  } else {
    nb::list segs;
    for (const auto& s : v.shard.segments) segs.append(nb::make_tuple(s.start, s.length));
    d["shard"] = nb::make_tuple(v.shard.dim, segs);
  }
  d["tied_to"] = v.tied_to.empty() ? nb::none() : nb::cast(v.tied_to);
  d["primary"] = v.shard.primary;
  return d;
}

}  // namespace

void init_layout(nb::module_& m) {
  m.def(
      "layout_build",
      [](const std::string& config_json, const std::string& engine, uint32_t tp_rank, uint32_t tp_size,
         const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>>& tensors,
         uint64_t vocab_padding, std::optional<std::tuple<std::string, std::string>> prefixes) {
        lo::Options o = options(engine, tp_rank, tp_size, vocab_padding, prefixes);
        std::vector<lo::EngineTensor> in;
        in.reserve(tensors.size());
        for (const auto& [name, dtype, shape] : tensors) {
          in.push_back(lo::EngineTensor{name, parse_dtype(dtype, "engine tensor \"" + name + "\""), shape});
        }
        lo::Layout layout;
        {
          nb::gil_scoped_release release;
          layout = lo::build(json::parse(config_json, "config.json"), in, o);
        }
        nb::list views;
        for (const auto& v : layout.views) views.append(view_dict(v));
        nb::dict d;
        d["info"] = info_dict(layout.info);
        d["views"] = views;
        d["unmapped"] = nb::cast(layout.unmapped);
        return d;
      },
      nb::arg("config_json"), nb::arg("engine"), nb::arg("tp_rank"), nb::arg("tp_size"), nb::arg("tensors"),
      nb::arg("vocab_padding") = lo::kVllmVocabPadding, nb::arg("prefixes").none() = nb::none(),
      "Views of every HF parameter inside the engine's tensors ((name, dtype, shape) tuples): a dict with "
      "info, views (dicts: hf_name, engine_name, dtype, offset, shape, strides in elements, hf_shape, "
      "shard = None when replicated else (dim, [(start, length), ...]), tied_to, primary: the lowest rank holding "
      "these elements) and unmapped engine names.");

  m.def(
      "layout_engine_of",
      [](const std::string& engine) { return std::string(lo::engine_name(lo::engine_of_manifest(engine))); },
      nb::arg("engine"),
      "The layout (\"vllm\" or \"hf\") of the engine a sharing manifest names (its model.engine): \"vllm\" for "
      "vLLM, \"hf\" for every engine livetrain runs itself.");

  m.def(
      "layout_check",
      [](const std::string& config_json) { lo::check_trainable(json::parse(config_json, "config.json")); },
      nb::arg("config_json"),
      "Raises UnsupportedError, naming the architecture and what is supported, for a checkpoint livetrain cannot "
      "train in place whatever the engine: mixture-of-experts, quantized, or a multimodal wrapper without a layout.");

  m.def(
      "layout_plan",
      [](const std::string& config_json, const std::string& engine, uint32_t tp_rank, uint32_t tp_size,
         uint64_t vocab_padding, std::optional<std::tuple<std::string, std::string>> prefixes) {
        lo::Options o = options(engine, tp_rank, tp_size, vocab_padding, prefixes);
        lo::Plan p = lo::plan(json::parse(config_json, "config.json"), o);
        nb::list hf;
        for (const auto& t : p.hf_tensors) {
          nb::dict d;
          d["name"] = t.name;
          d["shape"] = shape_tuple(t.shape);
          d["replicated"] = t.replicated;
          d["tied_to"] = t.tied_to.empty() ? nb::none() : nb::cast(t.tied_to);
          hf.append(d);
        }
        nb::list eng;
        for (const auto& e : p.engine) {
          nb::list pieces;
          for (const auto& pc : e.pieces) pieces.append(nb::make_tuple(pc.hf_name, pc.start, pc.length));
          nb::dict d;
          d["name"] = e.name;
          d["shape"] = shape_tuple(e.shape);
          d["dim"] = e.dim;
          d["pieces"] = pieces;
          d["padding"] = e.padding;
          eng.append(d);
        }
        nb::dict d;
        d["info"] = info_dict(p.info);
        d["hf_tensors"] = hf;
        d["engine"] = eng;
        return d;
      },
      nb::arg("config_json"), nb::arg("engine"), nb::arg("tp_rank"), nb::arg("tp_size"),
      nb::arg("vocab_padding") = lo::kVllmVocabPadding, nb::arg("prefixes").none() = nb::none(),
      "How the engine builds its tensors of one rank from HF tensors: hf_tensors (name, shape, replicated, "
      "tied_to) and engine tensors (name, shape, dim, pieces = [(hf_name, start, length)] concatenated along "
      "dim, then `padding` zero rows).");
}

}  // namespace livetrain::bindings
