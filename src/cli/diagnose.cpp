// `livetrain diagnose --manifest FILE [--model-dir DIR]`: a layout doctor. Maps the engine's tensors
// (from its manifest) to Hugging Face names through the layout of the model's config, and compares them
// with the model directory's safetensors files: matched, only in the engine, only on disk, mismatched.
#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <string>

#include "cli/command_line.hpp"
#include "cli/commands.hpp"
#include "livetrain/checkpoint/convert.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/json.hpp"
#include "livetrain/layout.hpp"
#include "livetrain/safetensors.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::cli {

namespace {

constexpr const char* kDiagnoseUsage =
    "usage: livetrain diagnose --manifest FILE [--model-dir DIR] [--json]\n"
    "\n"
    "Checks that an engine's shared tensors and a model directory describe the same model. The engine's\n"
    "tensors (names, dtypes, shapes, from its manifest) are mapped to Hugging Face parameters through the\n"
    "layout that the manifest's config.json and engine kind imply (docs/layouts.md: vLLM's merged qkv_proj,\n"
    "gate_up_proj, GatedDeltaNet projections, padded vocabularies, tensor-parallel shards; the reference\n"
    "engine's names are HF names), then compared with the safetensors files of DIR (default: the model\n"
    "path recorded in the manifest). Nothing is mapped and no lease is taken.\n"
    "\n"
    "Reports: matched parameters; parameters only the engine has; tensors of the text model only on disk;\n"
    "dtype or shape mismatches (under tensor parallelism the full HF shape is compared; a dtype the engine\n"
    "serves in and the checkpoint store converts, e.g. vLLM's F32 A_log over BF16 files, is listed apart,\n"
    "not a mismatch); tensors not served\n"
    "(outside the text model: a multimodal checkpoint's vision tower, an MTP head; not a mismatch, the\n"
    "checkpoint store carries them unchanged); engine tensors the layout does not use. Exit code 0 when everything "
    "matches, 1 when anything does not (or the layout itself fails,\n"
    "e.g. a missing engine tensor or an unsupported model family), 2 for bad arguments.\n"
    "\n"
    "options:\n"
    "  --manifest FILE   the engine's sharing manifest\n"
    "  --model-dir DIR   the model directory or .safetensors file to compare with\n"
    "  --json            print one JSON object: matched, only_in_engine, only_on_disk, mismatched, not_served,\n"
    "                    unmapped\n";

}  // namespace

int run_diagnose(const std::vector<std::string>& args) {
  std::string manifest_path, model_dir;
  bool as_json = false;
  CommandLine cmdline("diagnose", kDiagnoseUsage);
  cmdline.value("--manifest", manifest_path).value("--model-dir", model_dir).flag({"--json"}, as_json);
  if (!cmdline.parse(args)) return 0;
  if (manifest_path.empty()) throw UsageError("diagnose: --manifest FILE is required");

  sharing::Manifest m = sharing::manifest_read(manifest_path);
  if (model_dir.empty()) model_dir = m.model.path;
  if (model_dir.empty()) {
    throw UsageError("diagnose: the manifest records no model path; give --model-dir DIR");
  }
  if (m.model.config.members().empty()) {
    // Else the layout's own error ("config.json: missing ...") sends the user to the model's config.json.
    throw Error(ErrorCode::kFormat, manifest_path +
                                        ": the engine recorded no config.json in it (model.config is {}); the "
                                        "layout of its tensors comes from there");
  }
  std::vector<layout::EngineTensor> engine_tensors;
  for (const auto& t : m.tensors) engine_tensors.push_back({t.name, t.dtype, t.shape});
  layout::Options options;
  options.engine = layout::engine_of_manifest(m.model.engine);
  options.tp_rank = m.model.tp_rank;
  options.tp_size = m.model.tp_size;
  layout::Layout lay = layout::build(m.model.config, engine_tensors, options);
  safetensors::Model disk = safetensors::Model::open(model_dir);

  std::vector<std::string> matched, only_engine, mismatched, converted;
  std::set<std::string> seen;
  for (const layout::View& v : lay.views) {
    seen.insert(v.hf_name);
    const auto* e = disk.find(v.hf_name);
    if (!e) {
      if (v.tied_to.empty()) only_engine.push_back(v.hf_name);
      else matched.push_back(v.hf_name + " (tied to " + v.tied_to + ")");
      continue;
    }
    std::string problem;
    if (e->info->dtype != v.dtype && e->info->shape == v.hf_shape &&
        checkpoint::served_conversion_refusal(e->info->dtype, v.dtype).empty()) {
      // vLLM's A_log in F32 over BF16 files: the checkpoint store keeps it in the served dtype.
      converted.push_back(v.hf_name + ": " + std::string(dtype_name(e->info->dtype)) + " on disk, served as " +
                          std::string(dtype_name(v.dtype)));
      continue;
    }
    if (e->info->dtype != v.dtype) {
      problem += "dtype " + std::string(dtype_name(v.dtype)) + " in the engine, " +
                 std::string(dtype_name(e->info->dtype)) + " on disk";
    }
    if (e->info->shape != v.hf_shape) {
      if (!problem.empty()) problem += "; ";
      problem += "shape " + shape_string(v.hf_shape) + " in the engine, " + shape_string(e->info->shape) + " on disk";
    }
    if (problem.empty()) matched.push_back(v.hf_name);
    else mismatched.push_back(v.hf_name + ": " + problem);
  }
  // Tensors on disk that no view uses: outside the text model (a vision tower, an MTP head) they are not
  // served, which is no mismatch (the checkpoint store carries them unchanged); inside, they are.
  std::vector<std::string> only_disk, not_served;
  for (const std::string& name : disk.names()) {
    if (seen.count(name)) continue;
    (layout::in_text_model(lay.info, name) ? only_disk : not_served).push_back(name);
  }
  const bool ok = only_engine.empty() && only_disk.empty() && mismatched.empty();

  if (as_json) {
    auto list = [](const std::vector<std::string>& v) {
      json::Value a = json::Value::array();
      for (const auto& s : v) a.push(json::Value::string(s));
      return a;
    };
    json::Value root = json::Value::object();
    root.set("manifest", json::Value::string(manifest_path));
    root.set("model_dir", json::Value::string(model_dir));
    root.set("engine", json::Value::string(m.model.engine));
    root.set("family", json::Value::string(lay.info.family));
    root.set("ok", json::Value::boolean(ok));
    root.set("matched", list(matched));
    root.set("only_in_engine", list(only_engine));
    root.set("only_on_disk", list(only_disk));
    root.set("not_served", list(not_served));
    root.set("mismatched", list(mismatched));
    root.set("served_in_other_dtype", list(converted));
    root.set("unmapped", list(lay.unmapped));
    std::fputs(root.dump_pretty().c_str(), stdout);
    return ok ? 0 : 1;
  }
  std::printf("%s: engine \"%s\" (layout %s, family %s, tp %u/%u) against %s\n", manifest_path.c_str(),
              m.model.engine.c_str(), layout::engine_name(options.engine), lay.info.family.c_str(), options.tp_rank,
              options.tp_size, model_dir.c_str());
  auto section = [](const char* title, const std::vector<std::string>& items) {
    if (items.empty()) return;
    std::printf("\n%s (%zu):\n", title, items.size());
    for (const auto& s : items) std::printf("  %s\n", s.c_str());
  };
  section("only in the engine", only_engine);
  section("only on disk", only_disk);
  section("mismatched", mismatched);
  section("served in another dtype (the checkpoint store saves them so: docs/checkpoint.md)", converted);
  section("not served (outside the text model: carried unchanged by the checkpoint store, never trained)", not_served);
  section("engine tensors the layout does not use", lay.unmapped);
  std::printf(
      "\n%zu matched, %zu served in another dtype, %zu only in the engine, %zu only on disk, %zu mismatched, %zu not "
      "served: %s\n",
      matched.size(), converted.size(), only_engine.size(), only_disk.size(), mismatched.size(), not_served.size(),
      ok ? "the engine and the files agree" : "MISMATCH");
  return ok ? 0 : 1;
}

}  // namespace livetrain::cli
