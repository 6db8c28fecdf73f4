// Layouts: view arithmetic (offsets, strides, shards) for vLLM's merged tensors, and errors that name the
// model_type, tensor or field.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "livetrain/error.hpp"
#include "livetrain/json.hpp"
#include "livetrain/layout.hpp"

using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
namespace json = livetrain::json;
namespace lo = livetrain::layout;

namespace {

using Shape = std::vector<uint64_t>;

const char* kLlama = R"({"model_type": "llama", "hidden_size": 24, "num_hidden_layers": 2,
  "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 3, "intermediate_size": 40,
  "vocab_size": 77, "attention_bias": true, "tie_word_embeddings": false})";

const char* kQwen35 = R"({"model_type": "qwen3_5", "tie_word_embeddings": true, "text_config": {
  "model_type": "qwen3_5_text", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 20, "vocab_size": 130,
  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 3,
  "linear_value_head_dim": 5, "linear_conv_kernel_dim": 4, "full_attention_interval": 2}})";

lo::Options vllm(uint32_t rank, uint32_t size) {
  lo::Options o;
  o.tp_rank = rank;
  o.tp_size = size;
  return o;
}

// The engine tensors the plan expects, as a well-behaved engine would list them.
std::vector<lo::EngineTensor> engine_of(const json::Value& config, const lo::Options& o) {
  std::vector<lo::EngineTensor> out;
  for (const auto& e : lo::plan(config, o).engine) out.push_back({e.name, DType::kBF16, e.shape});
  return out;
}

const lo::View& view(const lo::Layout& l, const std::string& name) {
  auto it = std::find_if(l.views.begin(), l.views.end(), [&](const lo::View& v) { return v.hf_name == name; });
  if (it == l.views.end()) throw std::runtime_error("no view " + name);
  return *it;
}

template <typename F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no error";
  return Error(ErrorCode::kIo, "");
}

}  // namespace

TEST(Layout, ContiguousStrides) {
  EXPECT_EQ(lo::contiguous_strides({5, 1, 3}), (Shape{3, 3, 1}));
  EXPECT_EQ(lo::contiguous_strides({7}), (Shape{1}));
  EXPECT_EQ(lo::contiguous_strides({}), (Shape{}));
}

TEST(Layout, QkvViewsOfOneRank) {
  json::Value c = json::parse(kLlama);
  auto o = vllm(1, 2);
  lo::Layout l = lo::build(c, engine_of(c, o), o);
  // Rank 1 of 2: q heads 4..7 (12 rows), kv head 1 (3 rows each); qkv_proj is [12 + 3 + 3, 24].
  const lo::View& k = view(l, "model.layers.1.self_attn.k_proj.weight");
  EXPECT_EQ(k.engine_name, "model.layers.1.self_attn.qkv_proj.weight");
  EXPECT_EQ(k.offset, 12u * 24u);
  EXPECT_EQ(k.shape, (Shape{3, 24}));
  EXPECT_EQ(k.strides, (Shape{24, 1}));
  EXPECT_EQ(k.hf_shape, (Shape{6, 24}));
  ASSERT_FALSE(k.shard.replicated);
  EXPECT_EQ(k.shard.segments, (std::vector<lo::Segment>{{3, 3}}));
  const lo::View& vb = view(l, "model.layers.0.self_attn.v_proj.bias");
  EXPECT_EQ(vb.offset, 15u);
  EXPECT_EQ(vb.shape, (Shape{3}));
  // Row-parallel: this rank's 12 of 24 input columns, a strided view starting at column 12.
  const lo::View& oproj = view(l, "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(oproj.offset, 0u);
  EXPECT_EQ(oproj.shape, (Shape{24, 12}));
  EXPECT_EQ(oproj.strides, (Shape{12, 1}));
  EXPECT_EQ(oproj.shard.dim, 1u);
  EXPECT_EQ(oproj.shard.segments, (std::vector<lo::Segment>{{12, 12}}));
  // o_proj.bias is whole on every rank.
  EXPECT_TRUE(view(l, "model.layers.0.self_attn.o_proj.bias").shard.replicated);
  // gate_up_proj = [gate 20 rows; up 20 rows].
  const lo::View& up = view(l, "model.layers.0.mlp.up_proj.weight");
  EXPECT_EQ(up.offset, 20u * 24u);
  EXPECT_EQ(up.shard.segments, (std::vector<lo::Segment>{{20, 20}}));
  EXPECT_TRUE(l.unmapped.empty());
}

TEST(Layout, KvHeadsReplicatedWhenTpExceedsThem) {
  json::Value c = json::parse(kLlama);
  for (uint32_t rank = 0; rank < 8; ++rank) {
    auto o = vllm(rank, 8);
    lo::Layout l = lo::build(c, engine_of(c, o), o);
    const lo::View& v = view(l, "model.layers.0.self_attn.v_proj.weight");
    // One q head (3 rows) then one k head: kv head rank * 2 / 8.
    EXPECT_EQ(v.offset, (3u + 3u) * 24u);
    EXPECT_EQ(v.shard.segments, (std::vector<lo::Segment>{{3u * (rank * 2 / 8), 3}})) << rank;
  }
}

// Each element of an HF tensor has one primary rank (the one that saves it in a checkpoint): rank 0 for
// replicated tensors, the first of the ranks sharing a KV head.
TEST(Layout, ThePrimaryRankOfSharedKvHeadsAndReplicatedTensors) {
  json::Value c = json::parse(kLlama);  // 8 heads, 2 KV heads: at TP 4, ranks 0-1 share KV head 0, ranks 2-3 head 1
  for (uint32_t r = 0; r < 4; ++r) {
    auto o = vllm(r, 4);
    lo::Layout l = lo::build(c, engine_of(c, o), o);
    EXPECT_TRUE(view(l, "model.layers.0.self_attn.q_proj.weight").shard.primary) << r;
    EXPECT_EQ(view(l, "model.layers.0.self_attn.k_proj.weight").shard.primary, r % 2 == 0) << r;
    EXPECT_EQ(view(l, "model.layers.0.self_attn.v_proj.bias").shard.primary, r % 2 == 0) << r;
    EXPECT_EQ(view(l, "model.norm.weight").shard.primary, r == 0) << r;
    EXPECT_TRUE(view(l, "model.layers.1.mlp.down_proj.weight").shard.primary) << r;
  }
}

TEST(Layout, PaddedVocabulary) {
  json::Value c = json::parse(kLlama);
  // 77 rows pad to 128; TP 4 gives 32-row blocks: 32, 32, 13 real rows, then none.
  const uint64_t real[] = {32, 32, 13, 0};
  for (uint32_t rank = 0; rank < 4; ++rank) {
    auto o = vllm(rank, 4);
    auto engine = engine_of(c, o);
    lo::Layout l = lo::build(c, engine, o);
    for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"}) {
      const lo::View& v = view(l, name);
      EXPECT_EQ(v.shape, (Shape{real[rank], 24})) << name << rank;
      EXPECT_EQ(v.shard.segments, (std::vector<lo::Segment>{{std::min<uint64_t>(rank * 32, 77), real[rank]}}));
    }
    EXPECT_EQ(engine.front().shape, (Shape{32, 24}));
  }
  lo::Options padded_to_1 = vllm(0, 1);
  padded_to_1.vocab_padding = 1;
  EXPECT_EQ(lo::plan(c, padded_to_1).engine.front().shape, (Shape{77, 24}));
}

TEST(Layout, Qwen35GatedDeltaNetAndMultimodalPrefixes) {
  json::Value c = json::parse(kQwen35);
  auto o = vllm(1, 2);
  lo::Layout l = lo::build(c, engine_of(c, o), o);
  EXPECT_EQ(l.info.family, "qwen3_5");
  EXPECT_EQ(l.info.layer_types, (std::vector<std::string>{"linear_attention", "full_attention"}));
  // key_dim 6, value_dim 20; per rank: q 3, k 3, v 10 rows, then z 10 rows.
  const std::string p = "model.language_model.layers.0.linear_attn.";
  const lo::View& qkv = view(l, p + "in_proj_qkv.weight");
  EXPECT_EQ(qkv.engine_name, "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight");
  EXPECT_EQ(qkv.shape, (Shape{16, 16}));
  EXPECT_EQ(qkv.shard.segments, (std::vector<lo::Segment>{{3, 3}, {9, 3}, {22, 10}}));
  const lo::View& z = view(l, p + "in_proj_z.weight");
  EXPECT_EQ(z.offset, 16u * 16u);
  EXPECT_EQ(z.shard.segments, (std::vector<lo::Segment>{{10, 10}}));
  const lo::View& a = view(l, p + "in_proj_a.weight");
  EXPECT_EQ(a.offset, 2u * 16u);
  const lo::View& conv = view(l, p + "conv1d.weight");
  EXPECT_EQ(conv.shape, (Shape{16, 1, 4}));
  EXPECT_EQ(conv.hf_shape, (Shape{32, 1, 4}));
  EXPECT_EQ(conv.shard.segments, (std::vector<lo::Segment>{{3, 3}, {9, 3}, {22, 10}}));
  EXPECT_EQ(view(l, p + "A_log").shard.segments, (std::vector<lo::Segment>{{2, 2}}));
  EXPECT_TRUE(view(l, p + "norm.weight").shard.replicated);
  // Gated q: 2 heads of this rank, each [query; gate] of 4 rows.
  const lo::View& q = view(l, "model.language_model.layers.1.self_attn.q_proj.weight");
  EXPECT_EQ(q.shape, (Shape{16, 16}));
  EXPECT_EQ(q.hf_shape, (Shape{32, 16}));
  // Tied: lm_head is the embedding's view.
  const lo::View& head = view(l, "lm_head.weight");
  EXPECT_EQ(head.tied_to, "model.language_model.embed_tokens.weight");
  EXPECT_EQ(head.engine_name, "language_model.model.embed_tokens.weight");
}

TEST(Layout, HfEngineIsTheIdentity) {
  json::Value c = json::parse(kQwen35);
  lo::Options o;
  o.engine = lo::Engine::kHf;
  std::vector<lo::EngineTensor> engine = engine_of(c, o);
  engine.push_back({"model.visual.patch_embed.proj.weight", DType::kBF16, {4, 4}});
  lo::Layout l = lo::build(c, engine, o);
  for (const lo::View& v : l.views) {
    if (!v.tied_to.empty()) continue;
    EXPECT_EQ(v.engine_name, v.hf_name);
    EXPECT_EQ(v.offset, 0u);
    EXPECT_EQ(v.shape, v.hf_shape);
  }
  EXPECT_EQ(l.unmapped, (std::vector<std::string>{"model.visual.patch_embed.proj.weight"}));
}

TEST(Layout, UnsupportedModelTypesAreNamed) {
  Error e = error_of([] { lo::model_info(json::parse(R"({"model_type": "gpt2"})")); });
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
  EXPECT_NE(std::string(e.what()).find("\"gpt2\""), std::string::npos);
  e = error_of([] {
    lo::model_info(json::parse(R"({"model_type": "qwen3_5_moe", "text_config": {"model_type": "qwen3_5_moe_text"}})"));
  });
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
  EXPECT_NE(std::string(e.what()).find("mixture-of-experts"), std::string::npos);
}

// Issue #15: what livetrain cannot map is refused with the architecture named and what is supported.
TEST(Layout, QuantizedCheckpointsAndUnknownWrappersNameTheArchitecture) {
  // kQwen35 with fields added at the top level.
  auto qwen35_with = [](const std::string& fields) {
    return json::parse("{" + fields + ", " + std::string(kQwen35).substr(1));
  };
  json::Value c = qwen35_with(R"("architectures": ["Qwen3_5ForConditionalGeneration"])");
  EXPECT_EQ(lo::model_info(c).family, "qwen3_5");
  Error e = error_of([&] {
    lo::model_info(qwen35_with(
        R"("architectures": ["Qwen3_5ForConditionalGeneration"], "quantization_config": {"quant_method": "fp8"})"));
  });
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
  EXPECT_NE(std::string(e.what()).find("Qwen3_5ForConditionalGeneration"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("quant_method \"fp8\""), std::string::npos) << e.what();
  e = error_of([&] { lo::model_info(qwen35_with(R"("architectures": ["InternVLChatModel"])")); });
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
  EXPECT_NE(std::string(e.what()).find("architecture InternVLChatModel"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("LlavaForConditionalGeneration"), std::string::npos) << e.what();
  e = error_of(
      [] { lo::model_info(json::parse(R"({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]})")); });
  EXPECT_NE(std::string(e.what()).find("Qwen3MoeForCausalLM"), std::string::npos) << e.what();
  // The text model's tensors, and what lies outside it (not served).
  lo::ModelInfo info = lo::model_info(c);
  EXPECT_TRUE(lo::in_text_model(info, "model.language_model.layers.0.mlp.up_proj.weight"));
  EXPECT_TRUE(lo::in_text_model(info, "lm_head.weight"));
  EXPECT_FALSE(lo::in_text_model(info, "model.visual.blocks.0.attn.qkv.weight"));
  EXPECT_FALSE(lo::in_text_model(info, "mtp.fc.weight"));
}

// Issue #15: what no engine can train in place is refused before anything loads (check_trainable), whatever
// names the MoE: its model_type, its architecture, or an expert count; a dense family without a layout
// passes it (the reference engine serves it under HF names) and only the layout refuses it.
TEST(Layout, CheckTrainableRefusesMixtureOfExpertsByTypeArchitectureOrExpertCount) {
  auto refused = [](const char* config) {
    Error e = error_of([&] { lo::check_trainable(json::parse(config)); });
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("mixture-of-experts"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("supported: llama"), std::string::npos) << e.what();
    return std::string(e.what());
  };
  EXPECT_NE(refused(R"({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]})")
                .find("architecture OlmoeForCausalLM"),
            std::string::npos);
  EXPECT_NE(refused(R"({"model_type": "deepseek_v3", "n_routed_experts": 256})").find("(256 experts)"),
            std::string::npos);
  EXPECT_NE(refused(R"({"model_type": "llama", "num_local_experts": 8})").find("\"llama\""), std::string::npos);
  refused(R"({"model_type": "qwen3_5", "text_config": {"model_type": "qwen3_5_moe_text", "num_experts": 256}})");
  // Dense: no expert count, or zero experts.
  lo::check_trainable(json::parse(R"({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})"));
  lo::check_trainable(json::parse(R"({"model_type": "llama", "num_experts": 0})"));
  lo::check_trainable(json::parse(kLlama));
  Error e =
      error_of([] { lo::model_info(json::parse(R"({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})")); });
  EXPECT_NE(std::string(e.what()).find("has no layout"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("GPT2LMHeadModel"), std::string::npos) << e.what();
  // Qwen3-Next names its MoE layers one by one: the layout refuses the first, naming the architecture.
  const char* next = R"({"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "num_experts": 8,
      "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 8,
      "linear_num_key_heads": 1, "linear_num_value_heads": 1, "linear_key_head_dim": 1, "linear_value_head_dim": 1,
      "linear_conv_kernel_dim": 1})";
  lo::check_trainable(json::parse(next));
  e = error_of([&] { lo::model_info(json::parse(next)); });
  EXPECT_NE(std::string(e.what()).find("(architecture Qwen3NextForCausalLM): layer 0 is a mixture-of-experts layer"),
            std::string::npos)
      << e.what();
}

TEST(Layout, EngineMismatchesAreNamed) {
  json::Value c = json::parse(kLlama);
  auto o = vllm(0, 2);
  auto engine = engine_of(c, o);
  auto missing = engine;
  missing.erase(missing.begin() + 3);
  Error e = error_of([&] { lo::build(c, missing, o); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(e.what()).find(engine[3].name), std::string::npos);

  auto wrong = engine;
  wrong[5].shape[0] += 1;
  e = error_of([&] { lo::build(c, wrong, o); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArg);
  EXPECT_NE(std::string(e.what()).find(engine[5].name), std::string::npos);

  auto twice = engine;
  twice.push_back(engine[0]);
  e = error_of([&] { lo::build(c, twice, o); });
  EXPECT_NE(std::string(e.what()).find("listed twice"), std::string::npos);
}

TEST(Layout, ConfigAndTpErrorsNameTheField) {
  json::Value c = json::parse(kLlama);
  Error e = error_of([&] { lo::plan(c, vllm(0, 16)); });
  EXPECT_NE(std::string(e.what()).find("num_attention_heads"), std::string::npos);
  e = error_of([&] { lo::plan(c, vllm(3, 3)); });
  EXPECT_NE(std::string(e.what()).find("tp_rank 3"), std::string::npos);
  e = error_of([] { lo::model_info(json::parse(R"({"model_type": "qwen3", "hidden_size": 8})")); });
  EXPECT_EQ(e.code(), ErrorCode::kFormat);
  EXPECT_NE(std::string(e.what()).find("\"num_hidden_layers\""), std::string::npos);
  e = error_of([] {
    lo::model_info(json::parse(R"({"model_type": "qwen3_next", "hidden_size": 8, "num_hidden_layers": 2,
      "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 8, "linear_num_key_heads": 1,
      "linear_num_value_heads": 1, "linear_key_head_dim": 1, "linear_value_head_dim": 1,
      "linear_conv_kernel_dim": 1, "layer_types": ["full_attention"]})"));
  });
  EXPECT_NE(std::string(e.what()).find("layer_types"), std::string::npos);
  EXPECT_THROW(lo::engine_from_name("trt"), Error);
}

TEST(Layout, ZeroSizesAreRefusedByName) {
  for (const std::string key :
       {"hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim", "full_attention_interval"}) {
    std::string config = kQwen35, field = "\"" + key + "\": ";
    size_t at = config.find(field);
    ASSERT_NE(at, std::string::npos) << key;
    config.replace(at, config.find_first_of(",}", at) - at, field + "0");
    Error e = error_of([&] { lo::model_info(json::parse(config)); });
    EXPECT_EQ(e.code(), ErrorCode::kFormat) << key;
    EXPECT_NE(std::string(e.what()).find("\"" + key + "\" must be > 0"), std::string::npos) << e.what();
  }
}

TEST(Layout, EngineOfManifest) {
  // vLLM's tensors are merged and padded; every engine livetrain runs itself shares HF names and shapes.
  EXPECT_EQ(lo::engine_of_manifest("vllm"), lo::Engine::kVllm);
  EXPECT_EQ(lo::engine_of_manifest("reference"), lo::Engine::kHf);
  EXPECT_EQ(lo::engine_of_manifest("hf"), lo::Engine::kHf);
  EXPECT_EQ(lo::engine_of_manifest(""), lo::Engine::kHf);
}
