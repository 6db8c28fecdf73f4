// libFuzzer target: the manifest parser (and the JSON reader under it) on arbitrary bytes. Every input must
// either parse into a manifest whose tensors lie inside their buffers and that serializes back to text
// parsing to the same manifest, or be rejected with livetrain::Error; anything else is a finding.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace sh = livetrain::sharing;
  try {
    sh::Manifest m = sh::manifest_parse(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    for (const auto& t : m.tensors) {
      // The invariants attach relies on before it computes any address.
      if (t.buffer >= m.buffers.size() || t.shape.size() != t.strides.size()) std::abort();
      if (t.offset + sh::tensor_extent_bytes(t) > m.buffers[t.buffer].size) std::abort();
      if (m.find(t.name) != &t) std::abort();
    }
    std::string text = sh::manifest_serialize(m);
    if (sh::manifest_serialize(sh::manifest_parse(text, "fuzz round trip")) != text) std::abort();
  } catch (const livetrain::Error&) {
  }
  return 0;
}
