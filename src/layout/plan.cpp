// The per-rank plan of a model: its HF tensors, and how the engine (vLLM's merged tensor-parallel layout,
// or HF names unchanged) places each of them; views and engine construction are both derived from it.
#include <algorithm>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "layout/internal.hpp"
#include "livetrain/error.hpp"
#include "livetrain/layout.hpp"

namespace livetrain::layout {

Engine engine_from_name(std::string_view name) {
  if (name == "hf") return Engine::kHf;
  if (name == "vllm") return Engine::kVllm;
  throw Error(ErrorCode::kInvalidArg,
              "layout: unknown engine \"" + std::string(name) + "\" (expected \"hf\" or \"vllm\")");
}

const char* engine_name(Engine engine) { return engine == Engine::kHf ? "hf" : "vllm"; }

Engine engine_of_manifest(std::string_view engine) { return engine == "vllm" ? Engine::kVllm : Engine::kHf; }

std::vector<uint64_t> contiguous_strides(const std::vector<uint64_t>& shape) {
  std::vector<uint64_t> s(shape.size(), 1);
  for (size_t i = shape.size(); i-- > 1;) s[i - 1] = s[i] * shape[i];
  return s;
}

Prefixes hf_prefixes(const ModelInfo& m) {
  return m.multimodal ? Prefixes{"model.language_model.", ""} : Prefixes{"model.", ""};
}

bool in_text_model(const ModelInfo& info, std::string_view hf_name) {
  const Prefixes p = hf_prefixes(info);
  return hf_name.substr(0, p.body.size()) == p.body || hf_name == p.head + "lm_head.weight";
}

namespace {

using Shape = std::vector<uint64_t>;

Prefixes default_engine_prefixes(const ModelInfo& m, Engine engine) {
  if (engine == Engine::kHf) return hf_prefixes(m);
  // vLLM's multimodal wrappers (e.g. Qwen3VLForConditionalGeneration's hf_to_vllm_mapper) map
  // model.language_model. -> language_model.model. and lm_head. -> language_model.lm_head.
  return m.multimodal ? Prefixes{"language_model.model.", "language_model."} : Prefixes{"model.", ""};
}

class Planner {
 public:
  Planner(const ModelInfo& info, const Options& o, Prefixes eng)
      : o_(o), r_(o.tp_rank), tp_(o.tp_size), hfp_(hf_prefixes(info)), ep_(std::move(eng)) {
    plan_.info = info;
  }

  Plan run() {
    const ModelInfo& m = plan_.info;
    const uint64_t H = m.hidden_size;
    embedding(hfp_.body + "embed_tokens.weight", ep_.body + "embed_tokens.weight");
    for (uint64_t i = 0; i < m.num_layers; ++i) {
      std::string hl = hfp_.body + "layers." + std::to_string(i) + ".";
      std::string el = ep_.body + "layers." + std::to_string(i) + ".";
      replicated(hl + "input_layernorm.weight", el + "input_layernorm.weight", {H});
      if (m.layer_types[i] == "linear_attention") {
        gated_delta_net(hl + "linear_attn.", el + "linear_attn.");
      } else {
        attention(hl + "self_attn.", el + "self_attn.");
      }
      replicated(hl + "post_attention_layernorm.weight", el + "post_attention_layernorm.weight", {H});
      mlp(hl + "mlp.", el + "mlp.");
    }
    replicated(hfp_.body + "norm.weight", ep_.body + "norm.weight", {H});
    if (m.tied_embeddings) {
      add_hf(hfp_.head + "lm_head.weight", {m.vocab_size, H}, false, hfp_.body + "embed_tokens.weight");
    } else {
      embedding(hfp_.head + "lm_head.weight", ep_.head + "lm_head.weight");
    }
    if (o_.engine == Engine::kHf) identity_engine();
    return std::move(plan_);
  }

 private:
  uint64_t part(uint64_t total, const char* what) const {
    if (total % tp_ != 0) {
      throw Error(ErrorCode::kInvalidArg, std::string("layout: ") + what + " " + std::to_string(total) +
                                              " is not divisible by tp_size " + std::to_string(tp_));
    }
    return total / tp_;
  }

  // This rank's block of `total` rows when the tensor is split evenly.
  Piece block(const std::string& hf, uint64_t total, const char* what) const {
    uint64_t n = part(total, what);
    return Piece{hf, r_ * n, n};
  }

  void add_hf(std::string name, Shape shape, bool replicated, std::string tied_to = "") {
    index_[name] = plan_.hf_tensors.size();
    plan_.hf_tensors.push_back(HfTensor{std::move(name), std::move(shape), replicated, std::move(tied_to)});
  }

  const Shape& hf_shape(const std::string& name) const { return plan_.hf_tensors.at(index_.at(name)).shape; }

  void add_engine(std::string name, uint32_t dim, std::vector<Piece> pieces, uint64_t padding = 0) {
    Shape shape = hf_shape(pieces.front().hf_name);
    uint64_t n = padding;
    for (const Piece& p : pieces) n += p.length;
    shape[dim] = n;
    plan_.engine.push_back(EngineTensorPlan{std::move(name), std::move(shape), dim, std::move(pieces), padding});
  }

  void replicated(const std::string& hf, const std::string& eng, Shape shape) {
    uint64_t rows = shape[0];
    add_hf(hf, std::move(shape), true);
    add_engine(eng, 0, {Piece{hf, 0, rows}});
  }

  // Column-parallel, one HF tensor per engine tensor: this rank's block of rows.
  void column(const std::string& hf, const std::string& eng, Shape shape, const char* what) {
    uint64_t rows = shape[0];
    add_hf(hf, std::move(shape), false);
    add_engine(eng, 0, {block(hf, rows, what)});
  }

  // Row-parallel (input dim split): this rank's block of columns, a strided view.
  void row(const std::string& hf, const std::string& eng, Shape shape, const char* what) {
    uint64_t cols = shape[1];
    add_hf(hf, std::move(shape), false);
    Piece p = block(hf, cols, what);
    add_engine(eng, 1, {p});
  }

  // VocabParallelEmbedding / ParallelLMHead: rows padded to a multiple of vocab_padding, equal blocks
  // per rank, real rows first in each block.
  void embedding(const std::string& hf, const std::string& eng) {
    const uint64_t V = plan_.info.vocab_size;
    add_hf(hf, {V, plan_.info.hidden_size}, false);
    uint64_t pad = o_.engine == Engine::kVllm ? o_.vocab_padding : 1;
    if (pad == 0) throw Error(ErrorCode::kInvalidArg, "layout: vocab_padding must be > 0");
    uint64_t padded = (V + pad - 1) / pad * pad;
    if (padded % tp_ != 0) {
      throw Error(ErrorCode::kInvalidArg, "layout: vocab_size " + std::to_string(V) + " padded to " +
                                              std::to_string(padded) + " is not divisible by tp_size " +
                                              std::to_string(tp_));
    }
    uint64_t per = padded / tp_;
    uint64_t start = std::min<uint64_t>(r_ * per, V);
    uint64_t end = std::min<uint64_t>((r_ + 1) * per, V);
    add_engine(eng, 0, {Piece{hf, start, end - start}}, per - (end - start));
  }

  // QKVParallelLinear: [q heads; k heads; v heads] of this rank.
  void attention(const std::string& h, const std::string& e) {
    const ModelInfo& m = plan_.info;
    const uint64_t H = m.hidden_size, hd = m.head_dim;
    const uint64_t q_rows = m.num_heads * hd * (m.gated_q ? 2 : 1), kv_rows = m.num_kv_heads * hd;
    part(m.num_heads, "num_attention_heads");
    uint64_t kv_head, kv_count;
    if (m.num_kv_heads >= tp_) {
      kv_count = part(m.num_kv_heads, "num_key_value_heads");
      kv_head = r_ * kv_count;
    } else {
      if (tp_ % m.num_kv_heads != 0) {
        throw Error(ErrorCode::kInvalidArg, "layout: tp_size " + std::to_string(tp_) +
                                                " is not a multiple of num_key_value_heads " +
                                                std::to_string(m.num_kv_heads));
      }
      kv_count = 1;  // replicated: tp_size / num_kv_heads ranks share each KV head
      kv_head = r_ / (tp_ / m.num_kv_heads);
    }
    for (const char* suffix : {"weight", "bias"}) {
      bool bias = std::string(suffix) == "bias";
      if (bias && !m.qkv_bias) continue;
      auto shape = [&](uint64_t rows) { return bias ? Shape{rows} : Shape{rows, H}; };
      std::string q = h + "q_proj." + suffix, k = h + "k_proj." + suffix, v = h + "v_proj." + suffix;
      add_hf(q, shape(q_rows), false);
      add_hf(k, shape(kv_rows), false);
      add_hf(v, shape(kv_rows), false);
      add_engine(e + "qkv_proj." + suffix, 0,
                 {block(q, q_rows, "num_attention_heads"), Piece{k, kv_head * hd, kv_count * hd},
                  Piece{v, kv_head * hd, kv_count * hd}});
    }
    row(h + "o_proj.weight", e + "o_proj.weight", {H, m.num_heads * hd}, "num_attention_heads");
    if (m.o_bias) replicated(h + "o_proj.bias", e + "o_proj.bias", {H});
    if (m.qk_norm) {
      replicated(h + "q_norm.weight", e + "q_norm.weight", {hd});
      replicated(h + "k_norm.weight", e + "k_norm.weight", {hd});
    }
  }

  // MergedColumnParallelLinear [gate; up] and RowParallelLinear down.
  void mlp(const std::string& h, const std::string& e) {
    const ModelInfo& m = plan_.info;
    const uint64_t H = m.hidden_size, I = m.intermediate_size;
    for (const char* suffix : {"weight", "bias"}) {
      bool bias = std::string(suffix) == "bias";
      if (bias && !m.mlp_bias) continue;
      Shape shape = bias ? Shape{I} : Shape{I, H};
      std::string g = h + "gate_proj." + suffix, u = h + "up_proj." + suffix;
      add_hf(g, shape, false);
      add_hf(u, shape, false);
      add_engine(e + "gate_up_proj." + suffix, 0, {block(g, I, "intermediate_size"), block(u, I, "intermediate_size")});
    }
    row(h + "down_proj.weight", e + "down_proj.weight", {H, I}, "intermediate_size");
    if (m.mlp_bias) replicated(h + "down_proj.bias", e + "down_proj.bias", {H});
  }

  // GatedDeltaNet (vLLM gdn_linear_attn.py). Qwen3-Next checkpoints store in_proj_qkvz / in_proj_ba
  // already fused and interleaved per key-head group, loaded as one output shard (a block of rows per
  // rank); Qwen3.5 checkpoints store in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, merged per rank as
  // [q; k; v; z] and [b; a].
  void gated_delta_net(const std::string& h, const std::string& e) {
    const ModelInfo& m = plan_.info;
    const uint64_t H = m.hidden_size, nk = m.linear_num_key_heads, nv = m.linear_num_value_heads;
    const uint64_t kd = nk * m.linear_key_head_dim, vd = nv * m.linear_value_head_dim;
    const uint64_t kd_r = part(nk, "linear_num_key_heads") * m.linear_key_head_dim;
    const uint64_t nv_r = part(nv, "linear_num_value_heads");
    const uint64_t vd_r = nv_r * m.linear_value_head_dim;
    if (m.family == "qwen3_next") {
      column(h + "in_proj_qkvz.weight", e + "in_proj_qkvz.weight", {2 * kd + 2 * vd, H}, "linear_num_key_heads");
      column(h + "in_proj_ba.weight", e + "in_proj_ba.weight", {2 * nv, H}, "linear_num_key_heads");
    } else {
      std::string qkv = h + "in_proj_qkv.weight", z = h + "in_proj_z.weight";
      std::string b = h + "in_proj_b.weight", a = h + "in_proj_a.weight";
      add_hf(qkv, {2 * kd + vd, H}, false);
      add_hf(z, {vd, H}, false);
      add_hf(b, {nv, H}, false);
      add_hf(a, {nv, H}, false);
      add_engine(e + "in_proj_qkvz.weight", 0,
                 {Piece{qkv, r_ * kd_r, kd_r}, Piece{qkv, kd + r_ * kd_r, kd_r}, Piece{qkv, 2 * kd + r_ * vd_r, vd_r},
                  Piece{z, r_ * vd_r, vd_r}});
      add_engine(e + "in_proj_ba.weight", 0, {Piece{b, r_ * nv_r, nv_r}, Piece{a, r_ * nv_r, nv_r}});
    }
    // mamba_v2_sharded_weight_loader: conv1d's q, k and v channel ranges are each split across ranks.
    std::string conv = h + "conv1d.weight";
    add_hf(conv, {2 * kd + vd, 1, m.linear_conv_kernel}, false);
    add_engine(
        e + "conv1d.weight", 0,
        {Piece{conv, r_ * kd_r, kd_r}, Piece{conv, kd + r_ * kd_r, kd_r}, Piece{conv, 2 * kd + r_ * vd_r, vd_r}});
    column(h + "dt_bias", e + "dt_bias", {nv}, "linear_num_value_heads");
    column(h + "A_log", e + "A_log", {nv}, "linear_num_value_heads");
    replicated(h + "norm.weight", e + "norm.weight", {m.linear_value_head_dim});
    row(h + "out_proj.weight", e + "out_proj.weight", {H, vd}, "linear_num_value_heads");
  }

  // Engine tensors named and shaped as the HF tensors (the reference engine).
  void identity_engine() {
    plan_.engine.clear();
    for (const HfTensor& t : plan_.hf_tensors) {
      if (!t.tied_to.empty()) continue;
      std::string name = t.name;
      // Same tensor under the engine's prefix scheme (the identity when the prefixes agree).
      if (name.rfind(hfp_.body, 0) == 0) {
        name = ep_.body + name.substr(hfp_.body.size());
      } else if (name.rfind(hfp_.head, 0) == 0) {
        name = ep_.head + name.substr(hfp_.head.size());
      }
      plan_.engine.push_back(EngineTensorPlan{name, t.shape, 0, {Piece{t.name, 0, t.shape[0]}}, 0});
    }
  }

  const Options& o_;
  uint64_t r_, tp_;
  Prefixes hfp_, ep_;
  Plan plan_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace

Plan plan_with_prefixes(const ModelInfo& info, const Options& options, const Prefixes& engine_prefixes) {
  if (options.tp_size == 0) throw Error(ErrorCode::kInvalidArg, "layout: tp_size must be >= 1");
  if (options.tp_rank >= options.tp_size) {
    throw Error(ErrorCode::kInvalidArg, "layout: tp_rank " + std::to_string(options.tp_rank) +
                                            " is not below tp_size " + std::to_string(options.tp_size));
  }
  if (options.engine == Engine::kHf && options.tp_size != 1) {
    throw Error(ErrorCode::kInvalidArg, "layout: the \"hf\" engine holds unsharded tensors; tp_size must be 1");
  }
  return Planner(info, options, engine_prefixes).run();
}

Prefixes implied_engine_prefixes(const ModelInfo& info, Engine engine) { return default_engine_prefixes(info, engine); }

Plan plan(const json::Value& config, const Options& options) {
  ModelInfo info = model_info(config);
  Prefixes p = options.engine_prefixes ? *options.engine_prefixes : default_engine_prefixes(info, options.engine);
  return plan_with_prefixes(info, options, p);
}

}  // namespace livetrain::layout
