// Reads a model's config.json into ModelInfo through a table of families, so that no model's sizes are
// ever constants here.
#include <algorithm>
#include <cctype>
#include <string>
#include <vector>

#include "livetrain/error.hpp"
#include "livetrain/layout.hpp"

namespace livetrain::layout {

namespace {

enum class Bias { kNone, kAlways, kFromConfig };

// One row per supported model_type. Field defaults are those of the transformers config classes, used
// only when config.json omits the field (files saved by transformers write every field).
struct Family {
  const char* model_type;
  const char* family;
  Bias qkv_bias;
  bool o_bias_follows_attention_bias;  // Llama: o_proj has a bias iff attention_bias
  bool mlp_bias_from_config;           // Llama: mlp_bias
  bool qk_norm;
  bool hybrid;  // GatedDeltaNet layers, layer_types / full_attention_interval
};

constexpr Family kFamilies[] = {
    {"llama", "llama", Bias::kFromConfig, true, true, false, false},
    {"mistral", "llama", Bias::kNone, false, false, false, false},
    {"qwen2", "qwen2", Bias::kAlways, false, false, false, false},
    {"qwen3", "qwen3", Bias::kFromConfig, false, false, true, false},
    {"qwen3_next", "qwen3_next", Bias::kFromConfig, false, false, true, true},
    {"qwen3_5_text", "qwen3_5", Bias::kFromConfig, false, false, true, true},
    {"qwen3_5", "qwen3_5", Bias::kFromConfig, false, false, true, true},
};

// Known, well-formed, and declined: vLLM's FusedMoE re-lays out expert weights after load (w13/w2
// stacks, possibly padded or permuted per kernel), so a view of the served memory would not be the
// HF expert tensor.
constexpr const char* kMoeTypes[] = {"qwen2_moe", "qwen3_moe",      "qwen3_5_moe", "qwen3_5_moe_text",
                                     "mixtral",   "qwen3_next_moe", "llama4",      "llama4_text"};

// Multimodal wrappers whose text model the layouts map: Hugging Face files name it model.language_model.*
// (transformers >= 4.52 checkpoints), vLLM language_model.model.* (its hf_to_vllm_mapper). Another wrapper
// may lay its files out otherwise, so it is refused by name rather than mapped by guess.
constexpr const char* kMultimodalWrappers[] = {"Qwen3_5ForConditionalGeneration", "LlavaForConditionalGeneration",
                                               "Mistral3ForConditionalGeneration"};

// The first name of config.json's "architectures", or "" when it has none.
std::string architecture(const json::Value& config) {
  const json::Value* a = config.find("architectures");
  if (a == nullptr || !a->is_array() || a->items().empty() || !a->items()[0].is_string()) return "";
  return a->items()[0].as_string();
}

std::string named(const std::string& arch) { return arch.empty() ? std::string() : " (architecture " + arch + ")"; }

// A multimodal wrapper's text config (an object), or nullptr.
const json::Value* text_config(const json::Value& config) {
  const json::Value* text = config.find("text_config");
  return text != nullptr && text->is_object() ? text : nullptr;
}

// config.json's model_type (the text config's, inside a multimodal wrapper).
std::string model_type_of(const json::Value& config) {
  if (!config.is_object()) throw Error(ErrorCode::kFormat, "config.json: not a JSON object");
  const json::Value* text = text_config(config);
  const json::Value* type_value = nullptr;
  if (text != nullptr) type_value = text->find("model_type");
  if (type_value == nullptr) type_value = config.find("model_type");
  if (type_value == nullptr || !type_value->is_string()) {
    throw Error(ErrorCode::kFormat, "config.json: missing string field \"model_type\"");
  }
  return type_value->as_string();
}

// Experts per MoE layer as configs of the MoE families name the count (transformers' Qwen2/3 MoE, Mixtral,
// DeepSeek); 0 when none is set. Qwen3-Next declares its MoE layers one by one (reject_moe_layers).
uint64_t expert_count(const json::Value& config, const json::Value* text) {
  for (const json::Value* cfg : {text, &config}) {
    if (cfg == nullptr) continue;
    for (const char* key : {"num_experts", "num_local_experts", "n_routed_experts"}) {
      const json::Value* v = cfg->find(key);
      if (v == nullptr || v->is_null()) continue;
      if (auto n = v->as_u64(); n && *n > 0) return *n;
    }
  }
  return 0;
}

// Whether an architecture's class name says mixture-of-experts (Qwen3MoeForCausalLM, OlmoeForCausalLM,
// PhiMoEForCausalLM, ...).
bool moe_architecture(const std::string& arch) {
  std::string lower(arch);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  return lower.find("moe") != std::string::npos;
}

std::string supported_list() {
  std::string out;
  for (const Family& f : kFamilies) {
    if (!out.empty()) out += ", ";
    out += f.model_type;
  }
  return out;
}

uint64_t require_positive(const char* key, uint64_t v) {
  if (v == 0) throw Error(ErrorCode::kFormat, std::string("config.json: field \"") + key + "\" must be > 0");
  return v;
}

// Field lookup: the text config first, then the top level (multimodal configs keep e.g.
// tie_word_embeddings at the top).
class Fields {
 public:
  Fields(const json::Value& top, const json::Value* text) : top_(top), text_(text) {}

  const json::Value* find(const char* key) const {
    if (text_ != nullptr) {
      if (const json::Value* v = text_->find(key); v != nullptr && !v->is_null()) return v;
    }
    const json::Value* v = top_.find(key);
    return v != nullptr && !v->is_null() ? v : nullptr;
  }

  uint64_t u64(const char* key) const {
    const json::Value* v = find(key);
    if (v == nullptr) throw Error(ErrorCode::kFormat, std::string("config.json: missing field \"") + key + "\"");
    return checked_u64(key, *v);
  }

  uint64_t u64_or(const char* key, uint64_t fallback) const {
    const json::Value* v = find(key);
    return v == nullptr ? fallback : checked_u64(key, *v);
  }

  // A size: present (or `fallback`) and > 0.
  uint64_t positive(const char* key) const { return require_positive(key, u64(key)); }
  uint64_t positive_or(const char* key, uint64_t fallback) const {
    return require_positive(key, u64_or(key, fallback));
  }

  bool boolean_or(const char* key, bool fallback) const {
    const json::Value* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_bool()) {
      throw Error(ErrorCode::kFormat, std::string("config.json: field \"") + key + "\" must be a boolean, not " +
                                          json::type_name(v->type()));
    }
    return v->as_bool();
  }

 private:
  static uint64_t checked_u64(const char* key, const json::Value& v) {
    auto u = v.as_u64();
    if (!u) {
      throw Error(ErrorCode::kFormat, std::string("config.json: field \"") + key +
                                          "\" must be a non-negative integer, not " +
                                          (v.is_number() ? v.number_text() : json::type_name(v.type())));
    }
    return *u;
  }

  const json::Value& top_;
  const json::Value* text_;
};

std::vector<std::string> hybrid_layer_types(const Fields& f, uint64_t num_layers) {
  std::vector<std::string> out;
  if (const json::Value* lt = f.find("layer_types")) {
    if (!lt->is_array()) throw Error(ErrorCode::kFormat, "config.json: field \"layer_types\" must be an array");
    if (lt->items().size() != num_layers) {
      throw Error(ErrorCode::kFormat, "config.json: \"layer_types\" has " + std::to_string(lt->items().size()) +
                                          " entries, num_hidden_layers is " + std::to_string(num_layers));
    }
    for (size_t i = 0; i < lt->items().size(); ++i) {
      const json::Value& t = lt->items()[i];
      if (!t.is_string() || (t.as_string() != "full_attention" && t.as_string() != "linear_attention")) {
        throw Error(ErrorCode::kUnsupported, "config.json: layer_types[" + std::to_string(i) + "] is " +
                                                 (t.is_string() ? "\"" + t.as_string() + "\"" : t.dump()) +
                                                 "; supported: \"full_attention\", \"linear_attention\"");
      }
      out.push_back(t.as_string());
    }
    return out;
  }
  // transformers' Qwen3NextConfig / Qwen3_5TextConfig: every interval-th layer is full attention.
  uint64_t interval = f.positive_or("full_attention_interval", 4);
  for (uint64_t i = 0; i < num_layers; ++i) {
    out.push_back((i + 1) % interval != 0 ? "linear_attention" : "full_attention");
  }
  return out;
}

// Qwen3-Next declares MoE per layer (vLLM Qwen3NextDecoderLayer): layers outside mlp_only_layers whose
// index + 1 is a multiple of decoder_sparse_step are sparse when num_experts > 0.
void reject_moe_layers(const Fields& f, uint64_t num_layers, const std::string& arch) {
  uint64_t experts = f.u64_or("num_experts", 512);  // Qwen3NextConfig's default
  if (experts == 0) return;
  uint64_t step = f.u64_or("decoder_sparse_step", 1);
  std::vector<uint64_t> mlp_only;
  if (const json::Value* m = f.find("mlp_only_layers")) {
    if (!m->is_array()) throw Error(ErrorCode::kFormat, "config.json: field \"mlp_only_layers\" must be an array");
    for (const json::Value& v : m->items()) {
      auto u = v.as_u64();
      if (!u) throw Error(ErrorCode::kFormat, "config.json: \"mlp_only_layers\" must hold layer indices");
      mlp_only.push_back(*u);
    }
  }
  for (uint64_t i = 0; i < num_layers; ++i) {
    bool dense = std::find(mlp_only.begin(), mlp_only.end(), i) != mlp_only.end();
    if (!dense && step != 0 && (i + 1) % step == 0) {
      throw Error(ErrorCode::kUnsupported,
                  "config.json" + named(arch) + ": layer " + std::to_string(i) +
                      " is a mixture-of-experts layer (num_experts " + std::to_string(experts) +
                      "); vLLM re-lays out expert weights after load, so livetrain cannot view them; livetrain "
                      "trains dense models (supported: " +
                      supported_list() + ")");
    }
  }
}

}  // namespace

void check_trainable(const json::Value& config) {
  const std::string type = model_type_of(config);
  const json::Value* text = text_config(config);
  const std::string arch = architecture(config);
  // Mixture-of-experts, by type, by class name or by expert count (Qwen3-Next: per layer, in model_info).
  const bool moe_type =
      std::any_of(std::begin(kMoeTypes), std::end(kMoeTypes), [&](const char* m) { return type == m; });
  const uint64_t experts = type == "qwen3_next" ? 0 : expert_count(config, text);
  if (moe_type || moe_architecture(arch) || experts > 0) {
    throw Error(ErrorCode::kUnsupported,
                "config.json: model_type \"" + type + "\"" + named(arch) + " is mixture-of-experts" +
                    (experts > 0 ? " (" + std::to_string(experts) + " experts)" : std::string()) +
                    "; vLLM re-lays out expert weights after load, so livetrain cannot view them; livetrain "
                    "trains dense models (supported: " +
                    supported_list() + ")");
  }
  // Quantized weights are packed (and come with scales): a view of them is not the HF parameter.
  for (const json::Value* cfg : {&config, text}) {
    const json::Value* q = cfg == nullptr ? nullptr : cfg->find("quantization_config");
    if (q == nullptr || q->is_null()) continue;
    const json::Value* method = q->is_object() ? q->find("quant_method") : nullptr;
    throw Error(
        ErrorCode::kUnsupported,
        "config.json: the checkpoint" + named(arch) + " is quantized" +
            (method && method->is_string() ? " (quant_method \"" + method->as_string() + "\")" : std::string()) +
            "; livetrain trains unquantized bf16, fp16 or fp32 weights (supported model types: " + supported_list() +
            ")");
  }
  if (text != nullptr && !arch.empty() &&
      std::none_of(std::begin(kMultimodalWrappers), std::end(kMultimodalWrappers),
                   [&](const char* w) { return arch == w; })) {
    std::string wrappers;
    for (const char* w : kMultimodalWrappers) wrappers += std::string(wrappers.empty() ? "" : ", ") + w;
    throw Error(ErrorCode::kUnsupported, "config.json: architecture " + arch + " wraps a \"" + type +
                                             "\" text model in a way livetrain has no layout for (supported "
                                             "multimodal wrappers: " +
                                             wrappers + ")");
  }
}

ModelInfo model_info(const json::Value& config) {
  check_trainable(config);
  const std::string type = model_type_of(config);
  const json::Value* text = text_config(config);
  const std::string arch = architecture(config);
  const Family* fam = nullptr;
  for (const Family& f : kFamilies) {
    if (type == f.model_type) fam = &f;
  }
  if (fam == nullptr) {
    throw Error(ErrorCode::kUnsupported, "config.json: model_type \"" + type + "\"" + named(arch) +
                                             " has no layout (supported: " + supported_list() + ")");
  }

  Fields f(config, text);
  ModelInfo m;
  m.family = fam->family;
  m.model_type = type;
  m.multimodal = text != nullptr;
  m.hidden_size = f.positive("hidden_size");
  m.num_layers = f.u64("num_hidden_layers");
  m.vocab_size = f.positive("vocab_size");
  m.intermediate_size = f.positive("intermediate_size");
  m.num_heads = f.positive("num_attention_heads");
  m.num_kv_heads = f.positive_or("num_key_value_heads", m.num_heads);
  if (m.num_heads % m.num_kv_heads != 0) {
    throw Error(ErrorCode::kFormat, "config.json: num_attention_heads " + std::to_string(m.num_heads) +
                                        " is not a multiple of num_key_value_heads " + std::to_string(m.num_kv_heads));
  }
  if (f.find("head_dim") != nullptr) {
    m.head_dim = f.positive("head_dim");
  } else {
    if (m.hidden_size % m.num_heads != 0) {
      throw Error(ErrorCode::kFormat,
                  "config.json: no \"head_dim\", and hidden_size is not a multiple of "
                  "num_attention_heads");
    }
    m.head_dim = m.hidden_size / m.num_heads;  // > 0: hidden_size is a positive multiple of num_heads
  }

  bool attention_bias = f.boolean_or("attention_bias", false);
  m.qkv_bias = fam->qkv_bias == Bias::kAlways || (fam->qkv_bias == Bias::kFromConfig && attention_bias);
  m.o_bias = fam->o_bias_follows_attention_bias && attention_bias;
  m.mlp_bias = fam->mlp_bias_from_config && f.boolean_or("mlp_bias", false);
  m.qk_norm = fam->qk_norm;
  m.tied_embeddings = f.boolean_or("tie_word_embeddings", false);

  if (fam->hybrid) {
    // vLLM Qwen3NextAttention: getattr(config, "attn_output_gate", True).
    m.gated_q = f.boolean_or("attn_output_gate", true);
    m.linear_num_key_heads = f.positive("linear_num_key_heads");
    m.linear_num_value_heads = f.positive("linear_num_value_heads");
    m.linear_key_head_dim = f.positive("linear_key_head_dim");
    m.linear_value_head_dim = f.positive("linear_value_head_dim");
    m.linear_conv_kernel = f.positive("linear_conv_kernel_dim");
    if (m.linear_num_value_heads % m.linear_num_key_heads != 0) {
      throw Error(ErrorCode::kFormat,
                  "config.json: linear_num_value_heads is not a multiple of "
                  "linear_num_key_heads");
    }
    m.layer_types = hybrid_layer_types(f, m.num_layers);
    if (m.family == "qwen3_next") reject_moe_layers(f, m.num_layers, arch);
  } else {
    m.layer_types.assign(m.num_layers, "full_attention");
  }
  return m;
}

}  // namespace livetrain::layout
