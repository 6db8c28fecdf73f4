// libFuzzer target: the checkpoint store's COMMIT parser (commit_parse, and the JSON reader under it) on
// arbitrary bytes. Every input must either be rejected with livetrain::Error or parse into a commit every
// reader can walk without a further check: one generation per number oldest..head (at most kMaxGeneration,
// so loops over them end), each found by Commit::find, parts listed by rank with plain file names, tensors
// inside their files whose shape holds exactly their nbytes, names unique; and it serializes back to text
// parsing to the same commit. Anything else is a finding (a COMMIT with head 2^64 - 1 and no generations
// was read past the end of its list before this target existed).
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <string_view>

#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/format.hpp"
#include "livetrain/error.hpp"

namespace checkpoint = livetrain::checkpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    checkpoint::Commit c =
        checkpoint::commit_parse(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    if (c.head > checkpoint::kMaxGeneration || c.oldest > c.materialized || c.materialized > c.head) std::abort();
    if (c.generations.size() - 1 != c.head - c.oldest) std::abort();
    for (uint64_t g = c.oldest; g <= c.head; ++g) {
      const checkpoint::Generation* gen = c.find(g);
      if (!gen || gen->generation != g) std::abort();
      for (size_t r = 0; r < gen->parts.size(); ++r) {
        const checkpoint::Part& p = gen->parts[r];
        if (p.rank != r || gen->part(p.rank) != &p) std::abort();
        if (p.file.find('/') != std::string::npos || p.optimizer_state.find('/') != std::string::npos) std::abort();
      }
    }
    std::set<std::string> names;
    for (const auto& t : c.tensors) {
      if (!names.insert(t.name).second || t.file >= c.files.size()) std::abort();
      if (t.nbytes > c.files[t.file].size || t.offset > c.files[t.file].size - t.nbytes) std::abort();
      uint64_t bits = livetrain::dtype_bits(t.dtype);
      for (uint64_t d : t.shape) {
        if (__builtin_mul_overflow(bits, d, &bits)) std::abort();
      }
      if (bits % 8 != 0 || bits / 8 != t.nbytes) std::abort();
    }
    for (const auto& f : c.files) {
      if (f.name.empty() || f.name.find('/') != std::string::npos) std::abort();
    }
    std::string text = checkpoint::commit_serialize(c);
    if (checkpoint::commit_serialize(checkpoint::commit_parse(text, "fuzz round trip")) != text) std::abort();
  } catch (const livetrain::Error&) {
  }
  return 0;
}
