// Generations written by several tensor-parallel ranks, and served subsets: region copies against a plain
// loop, golden bytes of a part file with a region record, COMMIT version 1 still read, a TP 2 store
// restored at TP 1 and TP 3 (and a TP 1 store at TP 2) bit for bit, materialize equal to the TP 1 result,
// mismatched parts refused with the ranks named, tensors no save names kept bit-exact, and the optimizer
// state checked by verify (regression test for issue #13 item 10).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "checkpoint_shards.hpp"
#include "helpers.hpp"
#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/region.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/json.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace checkpoint = livetrain::checkpoint;
using checkpoint::Region;
using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
using livetrain::testing::expect_error;
using livetrain::testing::expect_state;
using livetrain::testing::hex;
using livetrain::testing::LiveModel;
using livetrain::testing::RankShard;
using livetrain::testing::TempDir;

namespace {

const int kOneThread = setenv("LIVETRAIN_NUM_THREADS", "1", 1);  // no pool before any fork

// A model directory written from make_live(seed, scale); `m` is the live copy tests change.
struct ModelDir {
  TempDir tmp;
  std::string path = tmp.file("model");
  LiveModel m;
  ModelDir(uint64_t seed, uint64_t scale) : m(livetrain::testing::make_live(seed, scale)) {
    livetrain::testing::write_model_dir(path, m);
  }
};

checkpoint::Store open_rank(const std::string& model, uint32_t rank, uint32_t ranks, const RankShard& shard,
                            const std::string& group = "engine-a") {
  checkpoint::OpenOptions o;
  o.rank = rank;
  o.ranks = ranks;
  o.held = shard.held();
  o.group = group;
  return checkpoint::Store::open(model, "", o);
}

// Saves generation `m` at TP `ranks` through every rank's store (parts, then rank 0 commits, then refresh).
checkpoint::SaveResult save_sharded(std::vector<checkpoint::Store>& stores, const LiveModel& m,
                                    uint64_t weight_version) {
  std::vector<checkpoint::PartDescriptor> parts;
  std::vector<RankShard> shards;
  const uint32_t ranks = static_cast<uint32_t>(stores.size());
  for (uint32_t r = 0; r < ranks; ++r) shards.push_back(livetrain::testing::shard_of(m, r, ranks));
  for (uint32_t r = ranks; r-- > 0;) parts.push_back(stores[r].save_part(shards[r].live(true)));
  checkpoint::SaveResult res = stores[0].commit_parts(parts, weight_version);
  for (auto& s : stores) EXPECT_EQ(s.refresh(), stores[0].commit().head);
  return res;
}

}  // namespace

TEST(CheckpointRegion, TransferMatchesAPlainLoop) {
  (void)kOneThread;
  std::mt19937_64 rng(5);
  const std::vector<uint64_t> shape = {7, 5, 6};
  std::vector<uint8_t> full(7 * 5 * 6 * 2);
  for (auto& b : full) b = static_cast<uint8_t>(rng());
  const Region whole = checkpoint::whole_region(shape);
  const Region rows{{2, 0, 0}, {3, 5, 6}}, cols{{0, 1, 2}, {7, 3, 4}}, inner{{3, 1, 3}, {2, 2, 2}};
  for (const Region& r : {rows, cols, inner, whole}) {
    std::vector<uint8_t> out(checkpoint::region_units(r) * 2);
    checkpoint::region_transfer(full.data(), whole, out.data(), r, r, 2, false);
    size_t k = 0;
    for (uint64_t i = r.start[0]; i < r.start[0] + r.shape[0]; ++i) {
      for (uint64_t j = r.start[1]; j < r.start[1] + r.shape[1]; ++j) {
        for (uint64_t l = r.start[2]; l < r.start[2] + r.shape[2]; ++l, ++k) {
          const size_t at = ((i * 5 + j) * 6 + l) * 2;
          ASSERT_EQ(out[2 * k], full[at]) << checkpoint::region_string(r);
          ASSERT_EQ(out[2 * k + 1], full[at + 1]) << checkpoint::region_string(r);
        }
      }
    }
  }
  // Between two regions: only the common part moves, XOR twice is the identity.
  std::optional<Region> common = checkpoint::region_intersect(rows, cols);
  ASSERT_TRUE(common);
  EXPECT_EQ(*common, (Region{{2, 1, 2}, {3, 3, 4}}));
  EXPECT_FALSE(checkpoint::region_intersect(Region{{0}, {4}}, Region{{4}, {2}}));
  std::vector<uint8_t> a(checkpoint::region_units(rows) * 2), b(checkpoint::region_units(cols) * 2, 0);
  checkpoint::region_transfer(full.data(), whole, a.data(), rows, rows, 2, false);
  checkpoint::region_transfer(a.data(), rows, b.data(), cols, *common, 2, true);
  std::vector<uint8_t> want(checkpoint::region_units(cols) * 2, 0);
  checkpoint::region_transfer(full.data(), whole, want.data(), cols, *common, 2, false);
  EXPECT_EQ(b, want);
  checkpoint::region_transfer(a.data(), rows, b.data(), cols, *common, 2, true);
  EXPECT_EQ(b, std::vector<uint8_t>(b.size(), 0));
  std::string msg = expect_error(
      [&] {
        checkpoint::check_region(Region{{0, 4}, {2, 3}}, {2, 6}, "t");
      },
      ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("[0:2, 4:7]"), std::string::npos) << msg;
}

// Pins the version-3 part header and a record with a region (docs/checkpoint.md) byte by byte.
TEST(CheckpointDelta, GoldenBytesOfAPartWithARegion) {
  // Rows 2..3 of a [4, 3] bf16 tensor; element (3, 1) changed by 0x0001.
  std::vector<uint8_t> bitmap = {0x10};
  std::vector<uint16_t> values = {0x0001};
  std::vector<checkpoint::RecordParts> recs = {{"w", DType::kBF16, 6, 1, bitmap.data(),
                                                reinterpret_cast<const uint8_t*>(values.data()),
                                                Region{{2, 0}, {2, 3}}}};
  std::vector<std::vector<std::string>> outs;
  checkpoint::encode_records(recs, outs);
  ASSERT_EQ(outs[0].size(), 1u);
  const std::string& rec = outs[0][0];
  EXPECT_EQ(hex(rec.substr(0, rec.size() - 8)),
            "01000000"
            "77"  // name
            "0e"
            "02"
            "00"
            "02"  // BF16, unit 2, gaps, 2 region dims
            "0200000000000000"
            "0000000000000000"  // region start (2, 0)
            "0200000000000000"
            "0300000000000000"  // region shape (2, 3)
            "0600000000000000"  // units: the region's
            "0100000000000000"  // changed
            "0100000000000000"
            "04"      // positions: 4 (row 1, column 1 of the region)
            "0100");  // XOR value
  std::string file = checkpoint::part_file_header(5, 4, 1, 1, 2) + rec;
  EXPECT_EQ(hex(file.substr(0, 40)),
            "4c54434b444c5431"
            "03000000"
            "01000000"
            "0500000000000000"
            "0400000000000000"
            "01000000"
            "02000000");
  uint64_t sum = checkpoint::xxh64(file.data(), file.size());
  file.append(reinterpret_cast<const char*>(&sum), 8);
  std::vector<checkpoint::DeltaRecord> parsed;
  checkpoint::DeltaHeader h = checkpoint::delta_parse(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "p",
                                                      [&](const checkpoint::DeltaRecord& r) { parsed.push_back(r); });
  EXPECT_EQ(h.version, checkpoint::kPartVersion);
  EXPECT_EQ(h.rank, 1u);
  EXPECT_EQ(h.ranks, 2u);
  ASSERT_EQ(parsed.size(), 1u);
  EXPECT_EQ(parsed[0].region, (Region{{2, 0}, {2, 3}}));
  std::vector<uint16_t> buf(6, 0x3f80);
  checkpoint::apply_record(parsed[0], reinterpret_cast<uint8_t*>(buf.data()), "p");
  EXPECT_EQ(buf[4], 0x3f81);
  EXPECT_EQ(checkpoint::hash_hex(checkpoint::xxh64(file.data(), file.size())), "cdf427f64fcf3c51");

  // A region in a version-2 delta, a region whose size is not `units`, ranks that are not ranks: refused.
  auto with_sum = [](std::string f) {
    uint64_t s = checkpoint::xxh64(f.data(), f.size());
    f.append(reinterpret_cast<const char*>(&s), 8);
    return f;
  };
  auto parse = [](const std::string& f) {
    checkpoint::delta_parse(reinterpret_cast<const uint8_t*>(f.data()), f.size(), "bad.delta",
                            [](const checkpoint::DeltaRecord&) {});
  };
  std::string msg =
      expect_error([&] { parse(with_sum(checkpoint::delta_file_header(5, 4, 1) + rec)); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("reserved"), std::string::npos) << msg;
  std::string bad = rec;
  bad[4 + 1 + 4 + 16 + 8] = 9;  // region shape (2, 9): 18 elements, not 6 (the record checksum is rewritten)
  uint64_t rsum = checkpoint::xxh64(bad.data(), bad.size() - 8);
  std::memcpy(bad.data() + bad.size() - 8, &rsum, 8);
  msg = expect_error([&] { parse(with_sum(checkpoint::part_file_header(5, 4, 1, 1, 2) + bad)); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("region"), std::string::npos) << msg;
  msg = expect_error([&] { parse(with_sum(checkpoint::part_file_header(5, 4, 1, 2, 2) + rec)); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("rank 2 of 2"), std::string::npos) << msg;
}

TEST(CheckpointCommit, Version1IsReadAsOnePartPerGeneration) {
  const std::string v1 = R"({"magic": "livetrain-checkpoint", "version": 1, "head": 1, "oldest": 0, "materialized": 0,
    "hash": "xxh64-4k", "files": [{"name": "model.safetensors", "size": 100, "hash": "0000000000000001"}],
    "generations": [
      {"generation": 0, "parent": 0, "time_ms": 1, "weight_version": 0, "delta": null, "bytes": 0, "changed": 0,
       "delta_hash": "0000000000000000", "optimizer_state": null},
      {"generation": 1, "parent": 0, "time_ms": 2, "weight_version": 7, "delta": "gen-00000000000000000001.delta",
       "bytes": 50, "changed": 3, "delta_hash": "00000000000000ab", "optimizer_state": "gen-00000000000000000001.optim"}],
    "tensors": [{"name": "w", "dtype": "BF16", "shape": [2], "file": 0, "offset": 8, "nbytes": 4}]})";
  checkpoint::Commit c = checkpoint::commit_parse(v1, "COMMIT");
  ASSERT_EQ(c.generations.size(), 2u);
  EXPECT_TRUE(c.generations[0].parts.empty());
  ASSERT_EQ(c.generations[1].parts.size(), 1u);
  const checkpoint::Part& p = c.generations[1].parts[0];
  EXPECT_EQ(p.file, "gen-00000000000000000001.delta");
  EXPECT_EQ(p.hash, 0xabu);
  EXPECT_EQ(p.optimizer_state, "gen-00000000000000000001.optim");
  EXPECT_FALSE(p.bytes);
  EXPECT_FALSE(p.optimizer_hash);
  // Written back as version 2, it reads the same.
  checkpoint::Commit again = checkpoint::commit_parse(checkpoint::commit_serialize(c), "COMMIT");
  EXPECT_EQ(again.generations[1].parts[0].file, p.file);
  EXPECT_FALSE(again.generations[1].parts[0].optimizer_hash);
  EXPECT_NE(checkpoint::commit_serialize(c).find("\"version\": 2"), std::string::npos);
  std::string v4 = v1;
  v4.replace(v4.find("\"version\": 1"), 12, "\"version\": 4");
  std::string msg = expect_error([&] { checkpoint::commit_parse(v4, "COMMIT"); }, ErrorCode::kUnsupported);
  EXPECT_NE(msg.find("versions 1 to 3"), std::string::npos) << msg;
}

// Issue #15: a tensor served in another dtype than the files' makes the COMMIT version 3 with "served".
TEST(CheckpointCommit, AServedDtypeIsWrittenAsVersion3AndConversionsAreChecked) {
  const std::string v1 = R"({"magic": "livetrain-checkpoint", "version": 1, "head": 0, "oldest": 0, "materialized": 0,
    "hash": "xxh64-4k", "files": [{"name": "model.safetensors", "size": 100, "hash": "0000000000000001"}],
    "generations": [{"generation": 0, "parent": 0, "time_ms": 1, "weight_version": 0, "delta": null, "bytes": 0,
       "changed": 0, "delta_hash": "0000000000000000", "optimizer_state": null}],
    "tensors": [{"name": "w", "dtype": "BF16", "shape": [2], "file": 0, "offset": 8, "nbytes": 4}]})";
  checkpoint::Commit c = checkpoint::commit_parse(v1, "COMMIT");
  EXPECT_EQ(c.tensors[0].served, DType::kBF16);
  EXPECT_EQ(c.tensors[0].served_nbytes(), 4u);
  c.tensors[0].served = DType::kF32;
  std::string text = checkpoint::commit_serialize(c);
  EXPECT_NE(text.find("\"version\": 3"), std::string::npos) << text;
  EXPECT_NE(text.find("\"served\": \"F32\""), std::string::npos) << text;
  checkpoint::Commit again = checkpoint::commit_parse(text, "COMMIT");
  EXPECT_EQ(again.tensors[0].served, DType::kF32);
  EXPECT_EQ(again.tensors[0].served_nbytes(), 8u);
  std::string f16 = text;
  f16.replace(f16.find("\"served\": \"F32\""), 15, "\"served\": \"F16\"");
  std::string msg = expect_error([&] { checkpoint::commit_parse(f16, "COMMIT"); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("tensors[0].served"), std::string::npos) << msg;
  c.tensors[0].served = DType::kBF16;  // back to the files' dtype: version 2, no "served"
  EXPECT_NE(checkpoint::commit_serialize(c).find("\"version\": 2"), std::string::npos);
}

// A COMMIT edited by hand or by an attacker is refused naming the field, never read past its end: head
// 2^64 - 1 with no generations passed the count check (head - oldest + 1 wrapped to 0) and every later
// lookup read outside the list (SIGSEGV), and a head of 2^64 - 1 made every loop over oldest..head
// endless; a shape that does not hold nbytes, or a name listed twice, were blamed on a delta file.
TEST(CheckpointCommit, GenerationNumbersShapesAndNamesFromOutsideAreChecked) {
  const std::string good = R"({"magic": "livetrain-checkpoint", "version": 2, "head": 0, "oldest": 0,
    "materialized": 0, "hash": "xxh64-4k", "files": [{"name": "model.safetensors", "size": 100,
    "hash": "0000000000000001"}], "generations": [{"generation": 0, "parent": 0, "time_ms": 1,
    "weight_version": 0, "bytes": 0, "changed": 0, "ranks": 1, "parts": []}],
    "tensors": [{"name": "w", "dtype": "BF16", "shape": [2, 3], "file": 0, "offset": 8, "nbytes": 12},
                {"name": "v", "dtype": "F4", "shape": [4], "file": 0, "offset": 20, "nbytes": 2}]})";
  checkpoint::Commit c = checkpoint::commit_parse(good, "COMMIT");
  EXPECT_EQ(c.head, 0u);
  ASSERT_EQ(c.tensors.size(), 2u);
  auto edited = [&](const std::string& from, const std::string& to) {
    std::string t = good;
    size_t at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  auto no_generations = [&](const std::string& head) {
    std::string t = edited(R"("head": 0)", head);
    const std::string g0 = R"([{"generation": 0, "parent": 0, "time_ms": 1,
    "weight_version": 0, "bytes": 0, "changed": 0, "ranks": 1, "parts": []}])";
    return t.replace(t.find(g0), g0.size(), "[]");
  };
  const std::string kMax = std::to_string(checkpoint::kMaxGeneration);
  const struct {
    std::string text, field;
  } bad[] = {
      {no_generations(R"("head": 18446744073709551615)"), "head"},  // the SIGSEGV
      {no_generations(R"("head": 0)"), "generations"},
      {edited(R"("shape": [2, 3])", R"("shape": [2, 4])"), "tensors[0].shape"},
      {edited(R"("shape": [2, 3])", R"("shape": [4294967296, 4294967297])"), "tensors[0].shape"},
      {edited(R"("shape": [4])", R"("shape": [3])"), "tensors[1].shape"},  // 12 bits: no whole byte
      {edited(R"("name": "v")", R"("name": "w")"), "tensors[1].name"},
  };
  for (const auto& b : bad) {
    std::string msg = expect_error([&] { checkpoint::commit_parse(b.text, "COMMIT"); }, ErrorCode::kFormat);
    EXPECT_NE(msg.find("COMMIT: " + b.field), std::string::npos) << msg;
  }
  // head = oldest = materialized = 2^64 - 1, with its one generation: beyond the largest generation number.
  std::string top = good;
  for (const char* key : {R"("head": 0)", R"("oldest": 0)", R"("materialized": 0)", R"("generation": 0)"}) {
    std::string k = key;
    top.replace(top.find(k), k.size(), k.substr(0, k.size() - 1) + "18446744073709551615");
  }
  std::string msg = expect_error([&] { checkpoint::commit_parse(top, "COMMIT"); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("COMMIT: head: beyond the largest generation number " + kMax), std::string::npos) << msg;
  // The largest itself is read (a save after it is refused: CheckpointStore.NoSaveAfterTheLargestGeneration).
  std::string last = good;
  for (const char* key : {R"("head": 0)", R"("oldest": 0)", R"("materialized": 0)", R"("generation": 0)"}) {
    std::string k = key;
    last.replace(last.find(k), k.size(), k.substr(0, k.size() - 1) + kMax);
  }
  EXPECT_EQ(checkpoint::commit_parse(last, "COMMIT").head, checkpoint::kMaxGeneration);
}

// Issue #15: a multimodal checkpoint's engine serves its text model only; the other tensors are carried.
TEST(CheckpointStore, TensorsNoSaveNamesStayBitExact) {
  ModelDir md(3, 4);
  const std::string& model = md.path;
  LiveModel& m = md.m;
  LiveModel first = m;
  checkpoint::Store s = checkpoint::Store::create(model);
  // The "served" set: every tensor but the norm (standing for a vision tower or an MTP head).
  livetrain::testing::perturb(m, 11, 0.3);
  std::vector<checkpoint::LiveTensor> served = m.views();
  const size_t norm = std::find(m.names.begin(), m.names.end(), "model.norm.weight") - m.names.begin();
  served.erase(served.begin() + static_cast<long>(norm));
  LiveModel want = m;
  want.data[norm] = first.data[norm];
  EXPECT_TRUE(s.save(served).written);
  expect_state(s, 1, want);
  s.materialize(1);
  livetrain::safetensors::Model files = livetrain::safetensors::Model::open(model);
  const auto& e = files.tensor("model.norm.weight");
  EXPECT_EQ(0, std::memcmp(e.file->data(*e.info), first.data[norm].data(), first.data[norm].size()));
  // Restore and compare of the served set leave the rest alone; an unknown name is refused.
  LiveModel scratch = livetrain::testing::make_live(99, 4);
  std::vector<checkpoint::LiveTensor> views = scratch.views();
  views.erase(views.begin() + static_cast<long>(norm));
  s.restore_live(0, views);
  for (size_t i = 0; i < m.names.size(); ++i) {
    if (i == norm) EXPECT_EQ(scratch.data[i], livetrain::testing::make_live(99, 4).data[i]);
    else EXPECT_EQ(scratch.data[i], first.data[i]) << m.names[i];
  }
  EXPECT_EQ(s.compare_live(0, views).tensors, 0u);
  views[0].name = "model.language_model.embed_tokens.weight";
  std::string msg = expect_error([&] { s.restore_live(0, views); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("model.language_model.embed_tokens.weight"), std::string::npos) << msg;
  // An engine that only restores opens without a head copy.
  s.close();
  checkpoint::OpenOptions none;
  none.held.emplace();
  checkpoint::Store reader = checkpoint::Store::open(model, "", none);
  EXPECT_EQ(reader.compare_live(1, served).tensors, 0u);
  expect_error([&] { reader.save(served); }, ErrorCode::kInvalidArg);
}

TEST(CheckpointStore, ModelFilesOfAnotherDtypeNameTheFirstDifferingTensor) {
  ModelDir md(3, 1);
  TempDir& tmp = md.tmp;
  const std::string& model = md.path;
  LiveModel& m = md.m;
  const std::string store = tmp.file("store");  // outside the model directory, which is replaced
  { checkpoint::Store::create(model, store); }
  LiveModel other = m;
  const size_t norm = std::find(m.names.begin(), m.names.end(), "model.norm.weight") - m.names.begin();
  other.dtypes[norm] = DType::kBF16;
  other.data[norm].resize(other.data[norm].size() / 2);
  std::filesystem::remove_all(model);
  livetrain::testing::write_model_dir(model, other);
  std::string msg = expect_error([&] { checkpoint::Store::open(model, store); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("\"model.norm.weight\" is BF16 [64] in the model files, F32 [64] in the store"), std::string::npos)
      << msg;
}

// Regression test for issue #13 item 10: `verify` said "store OK" for a truncated optimizer state.
TEST(CheckpointStore, VerifyChecksTheOptimizerStateHash) {
  ModelDir md(3, 1);
  TempDir& tmp = md.tmp;
  const std::string& model = md.path;
  LiveModel& m = md.m;
  std::string optim = tmp.file("optim.safetensors");
  livetrain::testing::write_bytes(optim, std::string(10000, 'x'));
  checkpoint::Store s = checkpoint::Store::create(model);
  livetrain::testing::perturb(m, 1, 0.1);
  checkpoint::SaveOptions o;
  o.optimizer_state = optim;
  s.save(m.views(), o);
  EXPECT_TRUE(s.verify().empty());
  std::string copy = s.dir() + "/" + s.commit().generations.back().parts[0].optimizer_state;
  std::string bytes = livetrain::testing::read_bytes(copy);
  livetrain::testing::write_bytes(copy, bytes.substr(0, 5000));
  std::vector<std::string> problems = s.verify();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find(copy), std::string::npos) << problems[0];
  EXPECT_NE(problems[0].find("truncated"), std::string::npos) << problems[0];
  bytes[7] ^= 1;  // same size, other bytes
  livetrain::testing::write_bytes(copy, bytes);
  problems = s.verify();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find("hash"), std::string::npos) << problems[0];
}

// A store written before parts existed (COMMIT version 1, version-2 deltas) opens, restores and grows.
TEST(CheckpointStore, AVersion1StoreIsReadAndExtended) {
  ModelDir md(4, 2);
  const std::string& model = md.path;
  LiveModel& m = md.m;
  std::vector<LiveModel> states = {m};
  {
    checkpoint::Store s = checkpoint::Store::create(model);
    for (int g = 1; g <= 2; ++g) {
      livetrain::testing::perturb(m, 20 + g, 0.05);
      s.save(m.views());
      states.push_back(m);
    }
  }
  // COMMIT rewritten the way version 1 wrote it.
  std::string dir = checkpoint::default_store_dir(model);
  checkpoint::Commit c = checkpoint::commit_read(dir);
  livetrain::json::Value root = livetrain::json::parse(checkpoint::commit_serialize(c), "COMMIT");
  root.set("version", livetrain::json::Value::unsigned_integer(1));
  livetrain::json::Value gens = livetrain::json::Value::array();
  for (const auto& g : c.generations) {
    livetrain::json::Value o = livetrain::json::Value::object();
    o.set("generation", livetrain::json::Value::unsigned_integer(g.generation));
    o.set("parent", livetrain::json::Value::unsigned_integer(g.parent));
    o.set("time_ms", livetrain::json::Value::number_text(std::to_string(g.time_ms)));
    o.set("weight_version", livetrain::json::Value::unsigned_integer(g.weight_version));
    o.set("delta", g.parts.empty() ? livetrain::json::Value::null() : livetrain::json::Value::string(g.parts[0].file));
    o.set("bytes", livetrain::json::Value::unsigned_integer(g.bytes));
    o.set("changed", livetrain::json::Value::unsigned_integer(g.changed));
    o.set("delta_hash", livetrain::json::Value::string(checkpoint::hash_hex(g.parts.empty() ? 0 : g.parts[0].hash)));
    o.set("optimizer_state", livetrain::json::Value::null());
    gens.push(std::move(o));
  }
  root.set("generations", std::move(gens));
  livetrain::fs::write_file_atomic(dir + "/COMMIT", root.dump_pretty() + "\n");
  checkpoint::Store s = checkpoint::Store::open(model);
  for (uint64_t g = 0; g <= 2; ++g) expect_state(s, g, states[g]);
  EXPECT_TRUE(s.verify().empty());
  livetrain::testing::perturb(m, 30, 0.05);
  s.save(m.views());
  s.close();
  s = checkpoint::Store::open(model);
  EXPECT_EQ(s.commit().head, 3u);
  expect_state(s, 3, m);
  expect_state(s, 1, states[1]);
}

TEST(CheckpointParts, Tp2GenerationsRestoreAtTp1AndTp3AndMaterializeLikeTp1) {
  ModelDir md(5, 8);
  const std::string& model = md.path;
  LiveModel& m = md.m;
  std::vector<LiveModel> states = {m};
  { checkpoint::Store::create(model); }
  {
    std::vector<checkpoint::Store> stores;
    for (uint32_t r = 0; r < 2; ++r) stores.push_back(open_rank(model, r, 2, livetrain::testing::shard_of(m, r, 2)));
    const double fractions[] = {0.01, 0.3, 0.0, 1.0};
    for (int g = 1; g <= 4; ++g) {
      livetrain::testing::perturb(m, 40 + g, fractions[g - 1]);
      checkpoint::SaveResult r = save_sharded(stores, m, 100 + g);
      EXPECT_EQ(r.written, fractions[g - 1] > 0) << g;
      if (r.written) states.push_back(m);
    }
    EXPECT_EQ(stores[0].commit().head, 3u) << "the unchanged step wrote nothing";
    const checkpoint::Generation& gen = stores[0].commit().generations.back();
    EXPECT_EQ(gen.ranks, 2u);
    ASSERT_EQ(gen.parts.size(), 2u);
    EXPECT_EQ(gen.parts[1].file, checkpoint::part_file_name(3, 1, 2));
    EXPECT_EQ(gen.weight_version, 104u);
    EXPECT_TRUE(stores[1].verify().empty());
    // Every rank restores its own regions (the replicated norm too) of any generation.
    for (uint32_t r = 0; r < 2; ++r) {
      RankShard got = livetrain::testing::shard_of(livetrain::testing::make_live(77, 8), r, 2);
      stores[r].restore_live(1, got.live());
      EXPECT_EQ(got.bufs, livetrain::testing::shard_of(states[1], r, 2).bufs) << "rank " << r;
      EXPECT_EQ(stores[r].compare_live(1, got.live()).tensors, 0u);
      EXPECT_GT(stores[r].compare_live(3, got.live()).elements, 0u);
    }
    // Rank 1 cannot materialize or commit; rank 0's materialize is the TP 1 result.
    expect_error([&] { stores[1].materialize(2); }, ErrorCode::kInvalidArg);
    stores[0].materialize(2);
  }
  // TP 1 reads the TP 2 store whole, bit for bit, and keeps saving.
  {
    checkpoint::Store s = checkpoint::Store::open(model);
    for (uint64_t g = 0; g <= 3; ++g) expect_state(s, g, states[g]);
    EXPECT_EQ(s.compare_live(3, m.views()).tensors, 0u);
    livetrain::testing::perturb(m, 50, 0.02);
    s.save(m.views());
    states.push_back(m);
    EXPECT_TRUE(s.verify().empty());
  }
  // TP 3 restores generations written at TP 1 and TP 2 into its regions, and writes its own.
  {
    std::vector<checkpoint::Store> stores;
    for (uint32_t r = 0; r < 3; ++r) stores.push_back(open_rank(model, r, 3, livetrain::testing::shard_of(m, r, 3)));
    for (uint64_t g : {4u, 2u, 0u}) {
      for (uint32_t r = 0; r < 3; ++r) {
        RankShard got = livetrain::testing::shard_of(livetrain::testing::make_live(78, 8), r, 3);
        stores[r].restore_live(g, got.live());
        EXPECT_EQ(got.bufs, livetrain::testing::shard_of(states[g], r, 3).bufs) << "generation " << g << " rank " << r;
      }
    }
    livetrain::testing::perturb(m, 51, 0.2);
    EXPECT_TRUE(save_sharded(stores, m, 7).written);
    states.push_back(m);
    // Rollback: every rank's regions back to generation 1, then saved as a new generation.
    std::vector<RankShard> back;
    for (uint32_t r = 0; r < 3; ++r) {
      back.push_back(livetrain::testing::shard_of(m, r, 3));
      stores[r].restore_live(1, back[r].live());
    }
    std::vector<checkpoint::PartDescriptor> parts;
    for (uint32_t r = 0; r < 3; ++r) parts.push_back(stores[r].save_part(back[r].live(true)));
    EXPECT_TRUE(stores[0].commit_parts(parts).written);
    for (auto& s : stores) s.refresh();
    states.push_back(states[1]);
  }
  checkpoint::Store s = checkpoint::Store::open(model);
  for (uint64_t g = 0; g < states.size(); ++g) expect_state(s, g, states[g]);
  // Materialized files equal what TP 1 writes, whatever TP size wrote the generations.
  s.materialize(5);
  livetrain::safetensors::Model files = livetrain::safetensors::Model::open(model);
  for (size_t i = 0; i < m.names.size(); ++i) {
    const auto& e = files.tensor(m.names[i]);
    EXPECT_EQ(0, std::memcmp(e.file->data(*e.info), states[5].data[i].data(), states[5].data[i].size())) << m.names[i];
  }
  s.gc(4);
  expect_state(s, 6, states[6]);
  EXPECT_TRUE(s.verify().empty());
}

TEST(CheckpointParts, MismatchedPartsAreRefusedWithTheRanksNamed) {
  ModelDir md(6, 2);
  const std::string& model = md.path;
  LiveModel& m = md.m;
  { checkpoint::Store::create(model); }
  std::vector<checkpoint::Store> stores;
  for (uint32_t r = 0; r < 2; ++r) stores.push_back(open_rank(model, r, 2, livetrain::testing::shard_of(m, r, 2)));
  expect_error([&] { open_rank(model, 1, 2, livetrain::testing::shard_of(m, 1, 2)); }, ErrorCode::kBusy);
  livetrain::testing::perturb(m, 60, 0.1);
  RankShard s0 = livetrain::testing::shard_of(m, 0, 2), s1 = livetrain::testing::shard_of(m, 1, 2);
  checkpoint::PartDescriptor p0 = stores[0].save_part(s0.live(true)), p1 = stores[1].save_part(s1.live(true));
  const std::string commit_before = livetrain::fs::read_file(stores[0].dir() + "/COMMIT");
  // Missing rank, twice the same rank, another TP size, another group, another generation, a torn file.
  std::string msg = expect_error([&] { stores[0].commit_parts({p0}); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("rank(s) 1 are missing"), std::string::npos) << msg;
  msg = expect_error([&] { stores[0].commit_parts({p0, p0}); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("rank 0's part is given twice"), std::string::npos) << msg;
  checkpoint::PartDescriptor bad = p1;
  bad.ranks = 4;
  msg = expect_error([&] { stores[0].commit_parts({p0, bad}); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("rank 1's part was written at tensor-parallel size 4"), std::string::npos) << msg;
  bad = p1;
  bad.group = "engine-b";
  msg = expect_error([&] { stores[0].commit_parts({p0, bad}); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("rank 1's part comes from \"engine-b\""), std::string::npos) << msg;
  bad = p1;
  bad.generation = 7;
  msg = expect_error([&] { stores[0].commit_parts({p0, bad}); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("rank 1's part is for generation 7"), std::string::npos) << msg;
  bad = p1;
  bad.part.hash ^= 1;
  msg = expect_error([&] { stores[0].commit_parts({p0, bad}); }, ErrorCode::kFormat);
  EXPECT_NE(msg.find("rank 1's part"), std::string::npos) << msg;
  EXPECT_NE(msg.find(p1.part.file), std::string::npos) << msg;
  msg = expect_error([&] { stores[1].commit_parts({p0, p1}); }, ErrorCode::kInvalidArg);
  EXPECT_NE(msg.find("rank 1 cannot commit"), std::string::npos) << msg;
  EXPECT_EQ(livetrain::fs::read_file(stores[0].dir() + "/COMMIT"), commit_before) << "nothing committed";
  // A replicated tensor saved by two ranks would be XORed twice: refused, naming both.
  {
    TempDir tmp2;
    std::string model2 = tmp2.file("model");
    LiveModel m2 = livetrain::testing::make_live(6, 2);
    livetrain::testing::write_model_dir(model2, m2);
    { checkpoint::Store::create(model2); }
    RankShard a = livetrain::testing::shard_of(m2, 0, 2), b = livetrain::testing::shard_of(m2, 1, 2);
    b.saved.assign(b.saved.size(), true);  // rank 1 saves the norm too
    checkpoint::Store r0 = open_rank(model2, 0, 2, a), r1 = open_rank(model2, 1, 2, b);
    livetrain::testing::perturb(m2, 61, 1.0);
    a = livetrain::testing::shard_of(m2, 0, 2);
    RankShard b2 = livetrain::testing::shard_of(m2, 1, 2);
    b2.saved.assign(b2.saved.size(), true);
    msg = expect_error(
        [&] {
          r0.commit_parts({r0.save_part(a.live(true)), r1.save_part(b2.live(true))});
        },
        ErrorCode::kInvalidArg);
    EXPECT_NE(msg.find("model.norm.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("rank 0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("rank 1"), std::string::npos) << msg;
  }
  // The right parts still commit; a rank whose part was not committed puts its head copy back.
  EXPECT_TRUE(stores[0].commit_parts({p1, p0}).written);
  EXPECT_EQ(stores[1].refresh(), 1u);
  LiveModel before = m;
  livetrain::testing::perturb(m, 62, 0.1);
  s0 = livetrain::testing::shard_of(m, 0, 2);
  s1 = livetrain::testing::shard_of(m, 1, 2);
  stores[0].save_part(s0.live(true));
  stores[1].save_part(s1.live(true));
  EXPECT_EQ(stores[1].refresh(), 1u);  // rank 0 never committed generation 2
  EXPECT_EQ(stores[1].compare_live(1, livetrain::testing::shard_of(before, 1, 2).live()).tensors, 0u);
  EXPECT_EQ(stores[0].refresh(), 1u);
  EXPECT_EQ(stores[0].compare_live(1, livetrain::testing::shard_of(before, 0, 2).live()).tensors, 0u);
  // A part saved after that is diffed against generation 1 again.
  checkpoint::PartDescriptor q0 = stores[0].save_part(s0.live(true)), q1 = stores[1].save_part(s1.live(true));
  EXPECT_TRUE(stores[0].commit_parts({q0, q1}).written);
  stores[1].refresh();
  stores[0].close();
  stores[1].close();
  checkpoint::Store s = checkpoint::Store::open(model);
  expect_state(s, 2, m);
  expect_state(s, 1, before);
}

#ifdef LIVETRAIN_WITH_CUDA
// save_part from GPU regions writes the same part files as from host memory, under every tuning of the GPU
// save (the pipelined encoder, the one-pass staged diff, digests, small groups), for sparse, no and dense
// changes at TP 2; the committed generations restore and verify.
TEST(CheckpointPartsCuda, EveryTuningWritesTheCpuPartsBytes) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  livetrain::testing::for_each_gpu_save_tuning([&] {
    ModelDir host_md(8, 200), gpu_md(8, 200);  // the same bytes: a 2.4 MiB embedding, several 1 MiB groups
    LiveModel& m = host_md.m;
    std::vector<checkpoint::Store> host, gpu;
    for (uint32_t r = 0; r < 2; ++r) {
      host.push_back(open_rank(host_md.path, r, 2, livetrain::testing::shard_of(m, r, 2)));
      gpu.push_back(open_rank(gpu_md.path, r, 2, livetrain::testing::shard_of(m, r, 2)));
    }
    const double fractions[] = {0.01, 0.0, 1.0, 0.2, 0.0};
    for (int step = 0; step < 5; ++step) {
      livetrain::testing::perturb(m, 300 + step, fractions[step]);
      std::vector<checkpoint::PartDescriptor> hp, gp;
      for (uint32_t r = 0; r < 2; ++r) {
        RankShard shard = livetrain::testing::shard_of(m, r, 2);
        hp.push_back(host[r].save_part(shard.live(true)));
        std::vector<checkpoint::LiveTensor> v = shard.live(true);
        std::vector<void*> dev(v.size());
        for (size_t i = 0; i < v.size(); ++i) {
          const size_t bytes =
              checkpoint::region_units(Region{v[i].start, v[i].shape}) * checkpoint::unit_bytes(v[i].dtype);
          ASSERT_EQ(cudaMalloc(&dev[i], bytes), cudaSuccess);
          ASSERT_EQ(cudaMemcpy(dev[i], v[i].data, bytes, cudaMemcpyHostToDevice), cudaSuccess);
          v[i].data = dev[i];
          v[i].device = 0;
        }
        gp.push_back(gpu[r].save_part(v));
        for (void* p : dev) cudaFree(p);
        EXPECT_EQ(hp[r].part.changed, gp[r].part.changed) << "step " << step << " rank " << r;
        EXPECT_EQ(livetrain::fs::read_file(livetrain::fs::join(host[r].dir(), hp[r].part.file)),
                  livetrain::fs::read_file(livetrain::fs::join(gpu[r].dir(), gp[r].part.file)))
            << "step " << step << " rank " << r;
      }
      const checkpoint::SaveResult a = host[0].commit_parts(hp), b = gpu[0].commit_parts(gp);
      ASSERT_EQ(a.written, b.written) << "step " << step;
      EXPECT_EQ(a.changed, b.changed) << "step " << step;
      for (auto& s : host) s.refresh();
      for (auto& s : gpu) s.refresh();
    }
    for (uint32_t r = 0; r < 2; ++r) {
      RankShard shard = livetrain::testing::shard_of(m, r, 2);
      EXPECT_EQ(gpu[r].compare_live(gpu[0].commit().head, shard.live()).elements, 0u) << "rank " << r;
    }
    EXPECT_TRUE(gpu[0].verify().empty());
  });
}
#endif
