// libFuzzer target: the safetensors header parser (and the JSON reader under it) on arbitrary bytes.
// Every input must either parse into a header whose tensors lie inside the buffer, or be rejected with
// livetrain::Error; anything else (crash, sanitizer report, other exception) is a finding.
#include <cstdint>
#include <cstdlib>

#include "livetrain/error.hpp"
#include "livetrain/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto h = livetrain::safetensors::parse_header(data, size, "fuzz");
    uint64_t end = h.data_start();
    for (const auto& t : h.tensors) {
      // The invariants the rest of livetrain relies on after a successful parse.
      if (t.end < t.begin || h.data_start() + t.end > size ||
          t.nbytes() * 8 != t.numel() * livetrain::dtype_bits(t.dtype)) {
        std::abort();
      }
      if (h.data_start() + t.begin != end) std::abort();
      end = h.data_start() + t.end;
      if (h.find(t.name) != &t) std::abort();
    }
    if (end != size) std::abort();
  } catch (const livetrain::Error&) {
  }
  return 0;
}
