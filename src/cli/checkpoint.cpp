// `livetrain checkpoint save|list|restore|verify|materialize|gc`: the delta checkpoint store from the
// command line (cron, scripts), reaching live weights through a sharing manifest.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "cli/command_line.hpp"
#include "cli/commands.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/json.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::cli {

namespace {

constexpr const char* kUsage =
    "usage: livetrain checkpoint <save|list|restore|verify|materialize|gc> MODEL [options]\n"
    "\n"
    "A delta checkpoint store (docs/checkpoint.md) keeps generations of a model's live weights as\n"
    "element-level XOR deltas in MODEL/.livetrain-store (or --store DIR).\n"
    "\n"
    "  save MODEL --manifest FILE      write the live weights' changes as a new generation (creates the\n"
    "                                  store on first use); --weight-version N, --optimizer-state FILE\n"
    "  list MODEL                      the committed generations\n"
    "  restore MODEL GEN --manifest FILE   set the live weights to generation GEN\n"
    "  restore MODEL GEN --out DIR     write generation GEN as a new model directory (DIR new or empty):\n"
    "                                  its safetensors files and index, and MODEL's other top-level files\n"
    "                                  as they are now (config.json, tokenizer and generation config files;\n"
    "                                  not hidden files, subdirectories or other weight formats: .bin, .pt, ...)\n"
    "  verify MODEL [--manifest FILE [--generation GEN]]\n"
    "                                  check the store's checksums and the model files' hashes, and\n"
    "                                  whether the live weights equal GEN (default: the head)\n"
    "  materialize MODEL GEN           bring MODEL's safetensors files to GEN in place (crash-safe);\n"
    "                                  --copy-symlinks replaces symlinked (HF cache) or hard-linked files\n"
    "                                  by copies first;\n"
    "                                  --round-to-file-dtype: see below\n"
    "  gc MODEL --keep-from GEN        forget generations before GEN (materializes GEN first if needed;\n"
    "                                  --copy-symlinks as for materialize)\n"
    "\n"
    "A tensor the engine serves in another dtype than the files' (vLLM keeps Qwen3.5's A_log in F32) is\n"
    "saved and restored in the served dtype (verify lists them). restore --out writes it in the files'\n"
    "dtype when its values fit exactly, else in the served dtype (and names it); so does materialize:\n"
    "a file holding such a tensor is rewritten whole (crash-safe) with it in the served dtype, and the\n"
    "tensor is named (transformers and vLLM load a F32 tensor into a BF16 model, casting it). With\n"
    "--round-to-file-dtype such values are rounded to the files' dtype instead (round to nearest even:\n"
    "LOSSY): the rounded weights are saved as a new generation, which the files then hold.\n"
    "\n"
    "options:\n"
    "  --store DIR       the store directory (default MODEL/.livetrain-store)\n"
    "  --json            print one JSON object on stdout\n"
    "  -q, --quiet       no progress on stderr\n";

struct Args {
  std::string sub, model, store, manifest, out, optimizer_state;
  std::optional<uint64_t> generation, weight_version, keep_from;
  bool as_json = false, quiet = false, copy_symlinks = false, round_to_file_dtype = false;
  std::set<std::string> given;  // the options given, by name
};

// A generation number (at most checkpoint::kMaxGeneration) or, with `max`, another unsigned number.
uint64_t parse_u64(const std::string& s, const std::string& what, uint64_t max = checkpoint::kMaxGeneration) {
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) {
    throw UsageError("checkpoint: " + what + " must be a non-negative integer, not '" + s + "'");
  }
  errno = 0;
  const unsigned long long v = std::strtoull(s.c_str(), nullptr, 10);
  if (errno == ERANGE || v > max) {
    throw UsageError("checkpoint: " + what + " '" + s + "' is too large (at most " + std::to_string(max) + ")");
  }
  return v;
}

// What each subcommand takes beyond MODEL and the options every one takes (--store, --json, -q): GEN as
// its third word, and its own options. Anything else is an error naming it, never silently ignored.
struct Takes {
  const char* sub;
  bool gen;
  std::set<std::string> options;
};
const Takes kTakes[] = {
    {"save", false, {"--manifest", "--weight-version", "--optimizer-state"}},
    {"list", false, {}},
    {"restore", true, {"--manifest", "--out"}},
    {"verify", false, {"--manifest", "--generation"}},
    {"materialize", true, {"--copy-symlinks", "--round-to-file-dtype"}},
    {"gc", false, {"--keep-from", "--copy-symlinks"}},
};

// The arguments, or nullopt when -h/--help was given (the usage is then printed).
std::optional<Args> parse(const std::vector<std::string>& args) {
  Args a;
  std::vector<std::string> pos;
  // A subcommand's own options: each notes that it was given (checked against kTakes below).
  auto flag = [&a](bool& out, const char* name) {
    return [&a, &out, name] {
      out = true;
      a.given.insert(name);
    };
  };
  auto number = [&a](std::optional<uint64_t>& out, const char* name, uint64_t max = checkpoint::kMaxGeneration) {
    return [&a, &out, name, max](const std::string& v) {
      out = parse_u64(v, name, max);
      a.given.insert(name);
    };
  };
  auto text = [&a](std::string& out, const char* name) {
    return [&a, &out, name](const std::string& v) {
      out = v;
      a.given.insert(name);
    };
  };
  CommandLine cmdline("checkpoint", kUsage);
  cmdline.flag({"--json"}, a.as_json)
      .flag({"-q", "--quiet"}, a.quiet)
      .flag({"--copy-symlinks"}, flag(a.copy_symlinks, "--copy-symlinks"))
      .flag({"--round-to-file-dtype"}, flag(a.round_to_file_dtype, "--round-to-file-dtype"))
      .value("--store", a.store)
      .value("--manifest", text(a.manifest, "--manifest"))
      .value("--out", text(a.out, "--out"))
      .value("--optimizer-state", text(a.optimizer_state, "--optimizer-state"))
      .value("--weight-version", number(a.weight_version, "--weight-version", UINT64_MAX))
      .value("--generation", number(a.generation, "--generation"))
      .value("--keep-from", number(a.keep_from, "--keep-from"))
      .positional(pos);
  if (!cmdline.parse(args)) return std::nullopt;
  if (pos.empty()) throw UsageError("checkpoint: missing subcommand (see livetrain checkpoint --help)");
  a.sub = pos[0];
  const Takes* takes = nullptr;
  for (const Takes& t : kTakes) takes = a.sub == t.sub ? &t : takes;
  if (!takes) throw UsageError("checkpoint: unknown subcommand '" + a.sub + "' (see livetrain checkpoint --help)");
  if (pos.size() < 2) throw UsageError("checkpoint " + a.sub + ": missing MODEL (see livetrain checkpoint --help)");
  a.model = pos[1];
  if (pos.size() >= 3 && !takes->gen) {
    throw UsageError("checkpoint " + a.sub + ": unexpected argument '" + pos[2] + "'" +
                     (a.sub == "gc"       ? " (the generation to keep from is --keep-from GEN)"
                      : a.sub == "verify" ? " (the generation to compare with is --generation GEN)"
                                          : ""));
  }
  if (pos.size() >= 3) a.generation = parse_u64(pos[2], "GEN");
  if (pos.size() > 3) throw UsageError("checkpoint " + a.sub + ": unexpected argument '" + pos[3] + "'");
  for (const std::string& o : a.given) {
    if (!takes->options.count(o)) {
      throw UsageError("checkpoint " + a.sub + ": " + o + " does not apply here (see livetrain checkpoint --help)");
    }
  }
  if (a.sub == "verify" && a.generation && a.manifest.empty()) {
    throw UsageError(
        "checkpoint verify: --generation GEN compares the live weights with GEN: it needs --manifest FILE");
  }
  return a;
}

// config.json's fields that fix the model's architecture (the text config's, in a multimodal wrapper), as far
// as both configs state them: an engine's config may add defaults or omit what it does not use, and a copy of
// the model elsewhere has the same ones.
constexpr const char* kArchitectureKeys[] = {"model_type",           "hidden_size",
                                             "num_hidden_layers",    "vocab_size",
                                             "intermediate_size",    "num_attention_heads",
                                             "num_key_value_heads",  "head_dim",
                                             "linear_num_key_heads", "linear_num_value_heads",
                                             "linear_key_head_dim",  "linear_value_head_dim"};

const json::Value& text_config(const json::Value& config) {
  const json::Value* text = config.find("text_config");
  return text != nullptr && text->is_object() ? *text : config;
}

// The live weights must be MODEL's: a manifest of an engine serving another model (same tensor names and
// shapes, say a fine-tune of another size's sibling) would otherwise be saved as a generation of MODEL, or
// be overwritten with MODEL's generation. Compared by the manifest's config against MODEL/config.json, when
// both exist (the engine may serve a copy of MODEL at another path); names both.
void check_same_model(const Args& a, const sharing::Manifest& m) {
  const json::Value& engine = text_config(m.model.config);
  const std::string path = fs::join(a.model, "config.json");
  if (!engine.is_object() || !fs::exists(path)) return;
  json::Value files;
  try {
    files = json::parse(fs::read_file(path), path);
  } catch (const Error&) {
    return;  // the store does not need config.json; nothing to compare with
  }
  if (!files.is_object()) return;
  const json::Value& mine = text_config(files);
  std::string theirs_text, mine_text;
  for (const char* key : kArchitectureKeys) {
    const json::Value *x = engine.find(key), *y = mine.find(key);
    if (x == nullptr || y == nullptr || x->dump() == y->dump()) continue;
    theirs_text += (theirs_text.empty() ? "" : ", ") + std::string(key) + " " + x->dump();
    mine_text += (mine_text.empty() ? "" : ", ") + std::string(key) + " " + y->dump();
  }
  if (theirs_text.empty()) return;
  throw Error(ErrorCode::kInvalidArg, "checkpoint " + a.sub + ": the manifest " + a.manifest +
                                          " is of another model than " + a.model + ": its engine serves " +
                                          (m.model.path.empty() ? "a model" : m.model.path) + " with " + theirs_text +
                                          ", " + path + " has " + mine_text +
                                          "; give the manifest of an engine serving " + a.model + " (or a copy of it)");
}

// The live weights behind a manifest: host tensors (shared memory) or GPU tensors (CUDA IPC), in place.
struct Live {
  std::shared_ptr<sharing::Attachment> attachment;
  std::vector<checkpoint::LiveTensor> tensors;
};

Live attach(const Args& a) {
  const std::string& manifest = a.manifest;
  Live l;
  l.attachment = sharing::Attachment::open(manifest);
  check_same_model(a, l.attachment->manifest());
  for (const auto& v : l.attachment->views()) {
    if (v.desc->strides != sharing::contiguous_strides(v.desc->shape)) {
      throw Error(ErrorCode::kUnsupported, manifest + ": tensor \"" + v.desc->name + "\" is not contiguous");
    }
    l.tensors.push_back(checkpoint::LiveTensor{v.desc->name, v.desc->dtype, v.desc->shape, v.data, v.device, {}});
  }
  return l;
}

checkpoint::Progress progress(const Args& a) {
  if (a.quiet) return {};
  return [](std::string_view what, uint64_t done, uint64_t total) {
    std::fprintf(stderr, "checkpoint: %.*s %llu/%llu\n", static_cast<int>(what.size()), what.data(),
                 static_cast<unsigned long long>(done), static_cast<unsigned long long>(total));
  };
}

std::string store_dir(const Args& a) { return a.store.empty() ? checkpoint::default_store_dir(a.model) : a.store; }

// The store, created on first use. When another process creates it at the same moment, this one opens it.
// `created`: this call created it (in a directory that did not exist, when `new_dir`).
checkpoint::Store open_or_create(const Args& a, bool& created, bool& new_dir) {
  const std::string commit = fs::join(store_dir(a), std::string(checkpoint::kCommitFileName));
  created = new_dir = false;
  if (!fs::exists(commit)) {
    new_dir = !fs::exists(store_dir(a));
    try {
      checkpoint::Store s = checkpoint::Store::create(a.model, a.store);
      created = true;
      return s;
    } catch (const Error&) {
      if (!fs::exists(commit)) throw;
    }
  }
  return checkpoint::Store::open(a.model, a.store, progress(a));
}

json::Value generation_json(const checkpoint::Generation& g) {
  json::Value o = json::Value::object();
  o.set("generation", json::Value::unsigned_integer(g.generation));
  o.set("parent", json::Value::unsigned_integer(g.parent));
  o.set("time_ms", json::Value::number_text(std::to_string(g.time_ms)));
  o.set("weight_version", json::Value::unsigned_integer(g.weight_version));
  o.set("bytes", json::Value::unsigned_integer(g.bytes));
  o.set("changed", json::Value::unsigned_integer(g.changed));
  o.set("ranks", json::Value::unsigned_integer(g.ranks));
  json::Value parts = json::Value::array();
  for (const auto& p : g.parts) {
    json::Value q = json::Value::object();
    q.set("rank", json::Value::unsigned_integer(p.rank));
    q.set("file", p.file.empty() ? json::Value::null() : json::Value::string(p.file));
    q.set("changed", json::Value::unsigned_integer(p.changed));
    q.set("optimizer_state", p.optimizer_state.empty() ? json::Value::null() : json::Value::string(p.optimizer_state));
    parts.push(std::move(q));
  }
  o.set("parts", std::move(parts));
  // A single-process generation's optimizer state (as before parts existed).
  const checkpoint::Part* p0 = g.ranks == 1 ? g.part(0) : nullptr;
  o.set("optimizer_state",
        p0 && !p0->optimizer_state.empty() ? json::Value::string(p0->optimizer_state) : json::Value::null());
  return o;
}

void print_json(const json::Value& v) {
  std::fputs(v.dump_pretty().c_str(), stdout);
  std::fputs("\n", stdout);
}

// A materialize that was interrupted: its journal is still in the store (list reads COMMIT and the journal's
// header only, and leaves it; whatever opens the store checks its entries and finishes it). Empty when there
// is none.
struct Pending {
  bool pending = false;
  std::optional<checkpoint::Journal> journal;  // its header; unset: the header cannot be read
  std::string path, problem;
};

Pending pending_materialize(const std::string& dir) {
  Pending p;
  p.path = fs::join(dir, std::string(checkpoint::kJournalFileName));
  if (!fs::exists(p.path)) return p;
  p.pending = true;
  try {
    // The header only: the entries and their checksums hold every changed byte (about the model's size after a
    // dense step: a minute of reading at 27B), and whatever opens the store checks them before the redo.
    const fs::Mapping bytes = fs::Mapping::open_readonly(p.path);
    p.journal = checkpoint::journal_parse_header(bytes.data(), bytes.size(), p.path);
  } catch (const Error& e) {
    p.problem = e.what();
  }
  return p;
}

int run_list(const Args& a) {
  checkpoint::Commit c = checkpoint::commit_read(store_dir(a));
  const Pending pending = pending_materialize(store_dir(a));
  std::string pending_text;
  if (pending.journal && pending.journal->to == c.materialized) {
    pending_text = "a materialize to generation " + std::to_string(c.materialized) +
                   " was committed; its journal is removed when the store is next opened";
  } else if (pending.journal && pending.journal->from == c.materialized) {
    pending_text =
        "a materialize of generation " + std::to_string(pending.journal->from) + " to " +
        std::to_string(pending.journal->to) + " was interrupted (" + pending.path +
        "): the model files may be partly at generation " + std::to_string(pending.journal->to) +
        "; any command that opens the store checks the journal and finishes it (livetrain checkpoint verify " +
        a.model + (a.store.empty() ? "" : " --store " + a.store) + "), then materialize " +
        std::to_string(pending.journal->from) + " undoes it";
  } else if (pending.pending) {
    pending_text = "a materialize journal is pending that cannot be redone (" +
                   (pending.problem.empty() ? pending.path + ": not for this COMMIT's generations" : pending.problem) +
                   "); opening the store reports what state the model files are in";
  }
  if (a.as_json) {
    json::Value root = json::Value::object();
    root.set("store", json::Value::string(store_dir(a)));
    root.set("head", json::Value::unsigned_integer(c.head));
    root.set("oldest", json::Value::unsigned_integer(c.oldest));
    root.set("materialized", json::Value::unsigned_integer(c.materialized));
    json::Value gens = json::Value::array();
    for (const auto& g : c.generations) gens.push(generation_json(g));
    root.set("generations", std::move(gens));
    json::Value jr = json::Value::null();
    if (pending.pending) {
      jr = json::Value::object();
      jr.set("journal", json::Value::string(pending.path));
      jr.set("from", pending.journal ? json::Value::unsigned_integer(pending.journal->from) : json::Value::null());
      jr.set("to", pending.journal ? json::Value::unsigned_integer(pending.journal->to) : json::Value::null());
      jr.set("what", json::Value::string(pending_text));
    }
    root.set("pending_materialize", std::move(jr));
    print_json(root);
    return 0;
  }
  std::printf("store %s: generations %llu..%llu, head %llu, model files at %llu\n", store_dir(a).c_str(),
              static_cast<unsigned long long>(c.oldest), static_cast<unsigned long long>(c.head),
              static_cast<unsigned long long>(c.head), static_cast<unsigned long long>(c.materialized));
  if (!pending_text.empty()) std::printf("note: %s\n", pending_text.c_str());
  std::printf("%10s  %-19s  %14s  %12s  %10s  %5s\n", "generation", "time (UTC)", "weight_version", "changed", "bytes",
              "ranks");
  for (const auto& g : c.generations) {
    std::time_t t = static_cast<std::time_t>(g.time_ms / 1000);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", std::gmtime(&t));
    std::printf("%10llu  %-19s  %14llu  %12llu  %10s  %5u%s%s\n", static_cast<unsigned long long>(g.generation), buf,
                static_cast<unsigned long long>(g.weight_version), static_cast<unsigned long long>(g.changed),
                human_bytes(g.bytes).c_str(), g.ranks, g.generation == c.head ? "  head" : "",
                g.generation == c.materialized ? "  materialized" : "");
  }
  return 0;
}

}  // namespace

int run_checkpoint(const std::vector<std::string>& args) {
  std::optional<Args> parsed = parse(args);
  if (!parsed) return 0;
  const Args& a = *parsed;
  if (a.sub == "list") return run_list(a);
  json::Value out = json::Value::object();
  std::string text;
  if (a.sub == "save") {
    if (a.manifest.empty()) throw UsageError("checkpoint save: --manifest FILE is required");
    Live live = attach(a);
    bool created = false, new_dir = false;
    checkpoint::Store s = open_or_create(a, created, new_dir);
    checkpoint::SaveOptions o;
    o.weight_version = a.weight_version.value_or(0);
    o.optimizer_state = a.optimizer_state;
    o.progress = progress(a);
    checkpoint::SaveResult r;
    try {
      r = s.save(live.tensors, o);
    } catch (const Error&) {
      // A first save that failed (another model's manifest, a missing optimizer state) leaves no store: one
      // would tie the model files to a store nobody saved in, and refuse them once changed.
      if (created) {
        try {
          s.discard_new(new_dir);
        } catch (const Error&) {  // the save's error is the one to report
        }
      }
      throw;
    }
    out.set("written", json::Value::boolean(r.written));
    out.set("generation", json::Value::unsigned_integer(r.generation));
    out.set("bytes", json::Value::unsigned_integer(r.bytes));
    out.set("changed", json::Value::unsigned_integer(r.changed));
    out.set("elements", json::Value::unsigned_integer(r.elements));
    out.set("model_bytes", json::Value::unsigned_integer(r.model_bytes));
    text = r.written ? "saved generation " + std::to_string(r.generation) + ": " + std::to_string(r.changed) + " of " +
                           std::to_string(r.elements) + " elements changed, " + human_bytes(r.bytes) + " written"
                     : "nothing changed since generation " + std::to_string(r.generation) + "; nothing written";
  } else if (a.sub == "restore") {
    if (!a.generation) throw UsageError("checkpoint restore: missing GEN");
    if (a.manifest.empty() == a.out.empty())
      throw UsageError("checkpoint restore: give exactly one of --manifest FILE and --out DIR");
    checkpoint::Store s = checkpoint::Store::open(a.model, a.store, progress(a));
    if (!a.manifest.empty()) {
      Live live = attach(a);
      s.restore_live(*a.generation, live.tensors);
      text = "live weights set to generation " + std::to_string(*a.generation);
    } else {
      std::vector<std::string> copied;
      std::vector<std::string> as_served = s.restore_to_dir(*a.generation, a.out, &copied);
      text = "generation " + std::to_string(*a.generation) + " written to " + a.out;
      json::Value files = json::Value::array();
      std::string list;
      for (const std::string& name : copied) {
        list += (list.empty() ? "" : ", ") + name;
        files.push(json::Value::string(name));
      }
      text += copied.empty() ? " (no other files in " + a.model + " to copy)"
                             : "; copied from " + a.model + " as they are: " + list;
      out.set("copied", std::move(files));
      json::Value served = json::Value::array();
      for (const std::string& name : as_served) {
        text += "\n  " + name + ": written in its served dtype (the files' dtype cannot hold its values)";
        served.push(json::Value::string(name));
      }
      out.set("out", json::Value::string(a.out));
      out.set("written_as_served", std::move(served));
    }
    out.set("generation", json::Value::unsigned_integer(*a.generation));
  } else if (a.sub == "verify") {
    checkpoint::Store s = checkpoint::Store::open(a.model, a.store, progress(a));
    std::vector<std::string> problems = s.verify(progress(a));
    json::Value list = json::Value::array();
    for (const auto& p : problems) list.push(json::Value::string(p));
    out.set("problems", std::move(list));
    bool ok = problems.empty();
    text = ok ? "store OK: generations " + std::to_string(s.commit().oldest) + ".." + std::to_string(s.commit().head)
              : "store has " + std::to_string(problems.size()) + " problem(s): " + problems.front();
    // Tensors the engine serves in another dtype: their deltas and restored values are in that dtype.
    json::Value served = json::Value::array();
    for (const auto& t : s.commit().tensors) {
      if (t.served == t.dtype) continue;
      json::Value o = json::Value::object();
      o.set("name", json::Value::string(t.name));
      o.set("dtype", json::Value::string(std::string(dtype_name(t.dtype))));
      o.set("served", json::Value::string(std::string(dtype_name(t.served))));
      served.push(std::move(o));
      text += "\n  " + t.name + ": " + std::string(dtype_name(t.dtype)) +
              " in the model files, saved and restored as " + std::string(dtype_name(t.served)) + " (as served)";
    }
    out.set("served_in_other_dtype", std::move(served));
    if (!a.manifest.empty()) {
      Live live = attach(a);
      uint64_t g = a.generation.value_or(s.commit().head);
      checkpoint::LiveDiff d = s.compare_live(g, live.tensors);
      out.set("generation", json::Value::unsigned_integer(g));
      out.set("live_equal", json::Value::boolean(d.tensors == 0));
      out.set("differing_tensors", json::Value::unsigned_integer(d.tensors));
      out.set("differing_elements", json::Value::unsigned_integer(d.elements));
      text += d.tensors == 0
                  ? "; live weights equal generation " + std::to_string(g)
                  : "; live weights differ from generation " + std::to_string(g) + " in " + std::to_string(d.elements) +
                        " elements of " + std::to_string(d.tensors) + " tensors (first: " + d.first + ")";
      ok = ok && d.tensors == 0;
    }
    out.set("ok", json::Value::boolean(ok));
    if (a.as_json) print_json(out);
    else std::printf("%s\n", text.c_str());
    return ok ? 0 : 1;
  } else if (a.sub == "materialize") {
    if (!a.generation) throw UsageError("checkpoint materialize: missing GEN");
    checkpoint::Store s = checkpoint::Store::open(a.model, a.store, progress(a));
    std::vector<std::string> widened =
        s.materialize(*a.generation, a.copy_symlinks, progress(a), a.round_to_file_dtype);
    const uint64_t now = s.commit().materialized;  // a rounded generation is a new one
    out.set("materialized", json::Value::unsigned_integer(now));
    text = "model files now hold generation " + std::to_string(now);
    json::Value rounded = json::Value::array();
    if (a.round_to_file_dtype) {
      for (const std::string& name : widened) {
        text += "\n  " + name + ": rounded to the files' dtype (lossy; generation " + std::to_string(now) +
                " holds the rounded weights, generation " + std::to_string(*a.generation) + " the served ones)";
        rounded.push(json::Value::string(name));
      }
      widened.clear();
    }
    out.set("rounded_to_file_dtype", std::move(rounded));
    json::Value served = json::Value::array();
    for (const std::string& name : widened) {
      const auto& t = *std::find_if(s.commit().tensors.begin(), s.commit().tensors.end(),
                                    [&](const checkpoint::TensorEntry& e) { return e.name == name; });
      text += "\n  " + name + ": written as " + std::string(dtype_name(t.dtype)) +
              ", its served dtype (the files' dtype cannot hold its trained values; its file was rewritten)";
      served.push(json::Value::string(name));
    }
    out.set("written_as_served", std::move(served));
  } else {  // gc
    if (!a.keep_from) throw UsageError("checkpoint gc: --keep-from GEN is required");
    checkpoint::Store s = checkpoint::Store::open(a.model, a.store, progress(a));
    s.gc(*a.keep_from, progress(a), a.copy_symlinks);
    out.set("oldest", json::Value::unsigned_integer(s.commit().oldest));
    text = "generations before " + std::to_string(*a.keep_from) + " removed";
  }
  if (a.as_json) print_json(out);
  else std::printf("%s\n", text.c_str());
  return 0;
}

}  // namespace livetrain::cli
