// Views of HF parameters inside the engine's tensors, from the plan, checked against the tensors the
// engine actually has.
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "layout/internal.hpp"
#include "livetrain/error.hpp"
#include "livetrain/layout.hpp"

namespace livetrain::layout {

namespace {

// The other naming schemes seen in practice, tried when the implied one does not match the engine.
const Prefixes kKnownPrefixes[] = {
    {"model.", ""},
    {"language_model.model.", "language_model."},
    {"model.language_model.", ""},
    {"", ""},
};

Prefixes detect_prefixes(const ModelInfo& info, const Options& o,
                         const std::unordered_map<std::string, const EngineTensor*>& by_name) {
  if (o.engine_prefixes) return *o.engine_prefixes;
  Prefixes implied = implied_engine_prefixes(info, o.engine);
  if (by_name.count(implied.body + "embed_tokens.weight")) return implied;
  for (const Prefixes& p : kKnownPrefixes) {
    if (by_name.count(p.body + "embed_tokens.weight")) return p;
  }
  return implied;  // the missing-tensor error then names the implied embed_tokens
}

}  // namespace

Layout build(const json::Value& config, const std::vector<EngineTensor>& engine_tensors, const Options& options) {
  std::unordered_map<std::string, const EngineTensor*> by_name;
  for (const EngineTensor& t : engine_tensors) {
    if (!by_name.emplace(t.name, &t).second) {
      throw Error(ErrorCode::kInvalidArg, "layout: engine tensor \"" + t.name + "\" is listed twice");
    }
  }
  ModelInfo info = model_info(config);
  Plan p = plan_with_prefixes(info, options, detect_prefixes(info, options, by_name));

  // Where each HF tensor lies: engine tensor index, and the run of pieces that are its.
  struct Place {
    size_t engine = 0;
    size_t first = 0;
    size_t count = 0;
  };
  std::unordered_map<std::string, Place> place;
  std::unordered_set<std::string> used;
  for (size_t e = 0; e < p.engine.size(); ++e) {
    const EngineTensorPlan& et = p.engine[e];
    auto it = by_name.find(et.name);
    if (it == by_name.end()) {
      throw Error(ErrorCode::kNotFound, "layout: engine tensor \"" + et.name + "\" (holding \"" +
                                            et.pieces.front().hf_name + "\") is missing from the engine");
    }
    if (it->second->shape != et.shape) {
      throw Error(ErrorCode::kInvalidArg,
                  "layout: engine tensor \"" + et.name + "\" has shape " + shape_string(it->second->shape) +
                      ", the config implies " + shape_string(et.shape) + " (" + engine_name(options.engine) +
                      ", tp rank " + std::to_string(options.tp_rank) + " of " + std::to_string(options.tp_size) + ")");
    }
    used.insert(et.name);
    for (size_t i = 0; i < et.pieces.size(); ++i) {
      auto [pl, fresh] = place.try_emplace(et.pieces[i].hf_name, Place{e, i, 0});
      // The plan only ever puts one HF tensor's pieces next to each other in one engine tensor; a view
      // needs exactly that.
      if (!fresh && (pl->second.engine != e || pl->second.first + pl->second.count != i)) {
        throw Error(ErrorCode::kFormat,
                    "layout: internal: pieces of \"" + et.pieces[i].hf_name + "\" are not adjacent");
      }
      ++pl->second.count;
    }
  }

  Layout out;
  out.info = p.info;
  std::unordered_map<std::string, size_t> view_index;
  for (const HfTensor& t : p.hf_tensors) {
    if (!t.tied_to.empty()) continue;
    const Place& pl = place.at(t.name);
    const EngineTensorPlan& et = p.engine[pl.engine];
    const EngineTensor& actual = *by_name.at(et.name);
    std::vector<uint64_t> strides = contiguous_strides(et.shape);
    uint64_t before = 0, length = 0;
    for (size_t i = 0; i < pl.first; ++i) before += et.pieces[i].length;
    View v;
    v.hf_name = t.name;
    v.engine_name = et.name;
    v.dtype = actual.dtype;
    v.offset = before * strides[et.dim];
    v.shape = et.shape;
    v.strides = strides;
    v.hf_shape = t.shape;
    v.shard.replicated = t.replicated;
    v.shard.dim = et.dim;
    for (size_t i = pl.first; i < pl.first + pl.count; ++i) {
      length += et.pieces[i].length;
      if (!t.replicated) v.shard.segments.push_back(Segment{et.pieces[i].start, et.pieces[i].length});
    }
    v.shape[et.dim] = length;
    view_index[t.name] = out.views.size();
    out.views.push_back(std::move(v));
  }
  // Which elements lower ranks hold (plans only: arithmetic), so that each element has one primary rank.
  if (options.tp_rank > 0) {
    std::unordered_map<std::string, std::vector<Segment>> lower;
    for (uint32_t r = 0; r < options.tp_rank; ++r) {
      Options o = options;
      o.tp_rank = r;
      for (const EngineTensorPlan& et : plan_with_prefixes(info, o, detect_prefixes(info, options, by_name)).engine) {
        for (const Piece& piece : et.pieces) lower[piece.hf_name].push_back(Segment{piece.start, piece.length});
      }
    }
    for (View& v : out.views) {
      v.shard.primary = !v.shard.replicated;
      for (const Segment& mine : v.shard.segments) {
        for (const Segment& theirs : lower[v.hf_name]) {
          if (mine.start < theirs.start + theirs.length && theirs.start < mine.start + mine.length)
            v.shard.primary = false;
        }
      }
    }
  }
  // Tied parameters are the same memory as the tensor they are tied to, in model order.
  std::vector<View> ordered;
  for (const HfTensor& t : p.hf_tensors) {
    if (t.tied_to.empty()) {
      ordered.push_back(out.views[view_index.at(t.name)]);
    } else {
      View v = out.views[view_index.at(t.tied_to)];
      v.hf_name = t.name;
      v.tied_to = t.tied_to;
      ordered.push_back(std::move(v));
    }
  }
  out.views = std::move(ordered);
  for (const EngineTensor& t : engine_tensors) {
    if (!used.count(t.name)) out.unmapped.push_back(t.name);
  }
  return out;
}

}  // namespace livetrain::layout
