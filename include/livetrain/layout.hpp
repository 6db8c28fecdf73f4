// Engine layout <-> Hugging Face layout: for every HF parameter of a model, the zero-copy view (offset,
// shape, strides) inside the inference engine's tensor that holds it, derived from the model's config.json.
//
// Two engine kinds. "hf": the engine's tensors carry HF names and full HF shapes (the reference engine),
// so every view is the whole tensor. "vllm": vLLM's merged, tensor-parallel layout, as its weight
// loaders build it (docs/layouts.md lists the files and versions read):
//   qkv_proj      = [q rows; k rows; v rows] of this rank (a KV head is replicated when tp_size exceeds
//                   the number of KV heads: rank r holds KV head r * num_kv_heads / tp_size);
//   gate_up_proj  = [gate rows; up rows] of this rank;
//   o_proj, down_proj, out_proj: row-parallel, this rank's columns (dim 1), a strided view;
//   embed_tokens, lm_head: vocabulary padded to a multiple of 64 and split in equal row blocks, the
//                   padding rows (at the end of the last ranks' blocks) not part of any view;
//   GatedDeltaNet (Qwen3-Next, Qwen3.5): in_proj_qkvz / in_proj_ba merged per rank, conv1d split into its
//                   q, k and v parts.
// A rank's part of an HF tensor is not always one slice: vLLM splits conv1d into q/k/v parts before
// sharding, so a Shard is a list of segments of the full tensor, concatenated in the engine's order.
//
// Everything here is plain arithmetic on names and shapes; nothing touches tensor memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/dtype.hpp"
#include "livetrain/json.hpp"

namespace livetrain::layout {

enum class Engine { kHf, kVllm };

// "hf" or "vllm"; anything else is an Error (kInvalidArg).
Engine engine_from_name(std::string_view name);
const char* engine_name(Engine engine);
// The layout of the engine a sharing manifest names (its model.engine): kVllm for "vllm", whose tensors are
// merged, padded and sharded; kHf for every engine livetrain runs itself ("reference", ...), which shares
// its tensors under their Hugging Face names and shapes. The one place that maps engines to layouts (the
// CLI's diagnose and Python's livetrain.layout.engine_layout ask it).
Engine engine_of_manifest(std::string_view engine);

// vLLM's DEFAULT_VOCAB_PADDING_SIZE (vocab_parallel_embedding.py).
inline constexpr uint64_t kVllmVocabPadding = 64;

// Where the text model's tensors live in a naming scheme: `body` precedes embed_tokens, layers and norm;
// `head` precedes lm_head. HF: "model." + "" for a causal LM, "model.language_model." + "" inside a
// multimodal wrapper; vLLM: "model." + "" and "language_model.model." + "language_model.".
struct Prefixes {
  std::string body;
  std::string head;
  bool operator==(const Prefixes&) const = default;
};

struct Options {
  Engine engine = Engine::kVllm;
  uint32_t tp_rank = 0;
  uint32_t tp_size = 1;
  uint64_t vocab_padding = kVllmVocabPadding;  // vLLM only
  // The engine's prefixes; unset: what the config implies, and build() also tries the other known
  // schemes when the implied one's embed_tokens is not among the engine tensors.
  std::optional<Prefixes> engine_prefixes;
};

// One tensor of the engine as the sharing manifest describes it; contiguous, row-major.
struct EngineTensor {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<uint64_t> shape;
};

// A run of `length` indices of the full HF tensor along the shard dim, starting at `start`.
struct Segment {
  uint64_t start = 0;
  uint64_t length = 0;
  bool operator==(const Segment&) const = default;
};

// Which part of the full HF tensor a rank holds: all of it (replicated), or the concatenation of
// `segments` along `dim`.
struct Shard {
  bool replicated = true;
  uint32_t dim = 0;
  std::vector<Segment> segments;
  // Whether this rank is the lowest rank holding these elements of the HF tensor: false for a replicated
  // tensor on ranks > 0 and for a KV head that tp_size / num_key_value_heads ranks share, on all but the
  // first of them. The one rank that saves them in a checkpoint (the others' copies are the same weights).
  bool primary = true;
};

// One HF parameter as a strided view into one engine tensor; offset and strides count elements.
struct View {
  std::string hf_name;
  std::string engine_name;
  DType dtype = DType::kBF16;
  uint64_t offset = 0;
  std::vector<uint64_t> shape;  // this rank's part
  std::vector<uint64_t> strides;
  std::vector<uint64_t> hf_shape;  // the full HF tensor
  Shard shard;
  // Non-empty for a tied lm_head: the HF parameter this one is (the same view, the same memory).
  std::string tied_to;
};

// What a config.json says about the model, in the terms the layouts need.
struct ModelInfo {
  std::string family;       // the row of the family table: llama, qwen2, qwen3, qwen3_next, qwen3_5
  std::string model_type;   // as written in the (text) config
  bool multimodal = false;  // the config wraps a text_config (HF prefix model.language_model.)
  uint64_t hidden_size = 0;
  uint64_t num_layers = 0;
  uint64_t vocab_size = 0;
  uint64_t intermediate_size = 0;
  uint64_t num_heads = 0;
  uint64_t num_kv_heads = 0;
  uint64_t head_dim = 0;
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  bool qk_norm = false;
  bool gated_q = false;  // q_proj holds [query; gate] per head (attn_output_gate)
  bool tied_embeddings = false;
  // GatedDeltaNet (linear_attention layers); zero when the family has none.
  uint64_t linear_num_key_heads = 0;
  uint64_t linear_num_value_heads = 0;
  uint64_t linear_key_head_dim = 0;
  uint64_t linear_value_head_dim = 0;
  uint64_t linear_conv_kernel = 0;
  std::vector<std::string> layer_types;  // "full_attention" or "linear_attention", one per layer
};

// Refuses (kUnsupported, naming config.json's architecture and what is supported) a checkpoint that
// livetrain cannot train in place whatever the engine: mixture-of-experts (by model_type, by an
// architecture named *Moe*, or by an expert count: num_experts, num_local_experts, n_routed_experts),
// quantized (quantization_config), or a multimodal wrapper without a layout. A dense model of a family
// without a layout passes: an engine that serves tensors under their Hugging Face names needs none.
void check_trainable(const json::Value& config);

// Reads config.json (already parsed): check_trainable, then the family's fields. A model_type without
// a layout, MoE layers, or a missing/ill-typed field is an Error naming it.
ModelInfo model_info(const json::Value& config);

// Step (2) of the layout, the inverse of the views: how the engine builds each of its tensors from HF
// tensors. Each piece is a run of rows (along `dim`) of one HF tensor copied to the next position of the
// engine tensor; `padding` indices along `dim` follow the pieces (vocabulary padding, left as zeros).
struct Piece {
  std::string hf_name;
  uint64_t start = 0;   // along dim in the full HF tensor
  uint64_t length = 0;  // along dim
};
struct EngineTensorPlan {
  std::string name;
  std::vector<uint64_t> shape;
  uint32_t dim = 0;
  std::vector<Piece> pieces;  // a piece whose length equals the HF size along dim, on a replicated
                              // tensor, is the whole tensor
  uint64_t padding = 0;
};
struct HfTensor {
  std::string name;
  std::vector<uint64_t> shape;
  bool replicated = false;  // every rank holds all of it
  std::string tied_to;      // lm_head under tie_word_embeddings: no engine tensor of its own
};
struct Plan {
  ModelInfo info;
  std::vector<HfTensor> hf_tensors;      // in model order
  std::vector<EngineTensorPlan> engine;  // this rank's engine tensors
};

// The plan for one rank. TP sizes that the config's head counts or sizes do not divide are an Error
// naming the field; so is tp_size > 1 with the "hf" engine (its tensors are unsharded).
Plan plan(const json::Value& config, const Options& options);

struct Layout {
  ModelInfo info;
  std::vector<View> views;            // one per HF parameter, in model order
  std::vector<std::string> unmapped;  // engine tensors no view uses (vision tower, mtp, ...)
};

// Views for every HF parameter, checked against the engine's tensor list: a tensor the plan needs that
// is missing, or whose shape differs, is an Error naming it (kNotFound / kInvalidArg).
Layout build(const json::Value& config, const std::vector<EngineTensor>& engine_tensors, const Options& options);

// The Hugging Face prefixes of the text model in the model files: "model." / "" for a causal LM,
// "model.language_model." / "" inside a multimodal wrapper.
Prefixes hf_prefixes(const ModelInfo& info);

// Whether a tensor of the model files belongs to the text model that the layouts serve (under the body
// prefix, or the lm_head). A multimodal checkpoint's vision tower (model.visual.*) and a release's
// multi-token-prediction head (mtp.*) do not: engines do not serve them, and the checkpoint store carries
// them unchanged.
bool in_text_model(const ModelInfo& info, std::string_view hf_name);

// Row-major strides (in elements) of a contiguous tensor of `shape`.
std::vector<uint64_t> contiguous_strides(const std::vector<uint64_t>& shape);

}  // namespace livetrain::layout
