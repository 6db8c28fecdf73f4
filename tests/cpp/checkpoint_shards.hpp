// Helpers of the sharded checkpoint tests: the regions a tensor-parallel rank of the test model holds (rows
// of the embedding and of up_proj, columns of q_proj, the replicated norm on every rank) and the live
// buffers of those regions cut out of full tensors.
#pragma once

#include <string>
#include <vector>

#include "checkpoint_helpers.hpp"
#include "livetrain/checkpoint/region.hpp"
#include "livetrain/checkpoint/store.hpp"

namespace livetrain::testing {

// One rank's regions of a LiveModel: `held` are the regions it saves (the replicated norm only on rank 0),
// `bufs`/`live()` the memory of every region it holds (the norm on every rank).
struct RankShard {
  uint32_t rank = 0, ranks = 1;
  std::vector<std::string> names;
  std::vector<DType> dtypes;
  std::vector<checkpoint::Region> regions;
  std::vector<bool> saved;  // saved by this rank (replicated tensors: rank 0 only)
  std::vector<std::vector<uint8_t>> bufs;

  std::vector<checkpoint::HeldRegion> held() const {
    std::vector<checkpoint::HeldRegion> h;
    for (size_t i = 0; i < names.size(); ++i) {
      if (saved[i]) h.push_back(checkpoint::HeldRegion{names[i], regions[i]});
    }
    return h;
  }
  std::vector<checkpoint::LiveTensor> live(bool only_saved = false) {
    std::vector<checkpoint::LiveTensor> v;
    for (size_t i = 0; i < names.size(); ++i) {
      if (only_saved && !saved[i]) continue;
      v.push_back(checkpoint::LiveTensor{names[i], dtypes[i], regions[i].shape, bufs[i].data(), -1, regions[i].start});
    }
    return v;
  }
};

// The split of make_live's tensors at TP `ranks` (any size up to the smallest split dim).
inline checkpoint::Region rank_region(const std::string& name, const std::vector<uint64_t>& shape, uint32_t rank,
                                      uint32_t ranks) {
  checkpoint::Region r = checkpoint::whole_region(shape);
  int dim = -1;
  if (name.find("embed_tokens") != std::string::npos || name.find("up_proj") != std::string::npos) dim = 0;  // rows
  if (name.find("q_proj") != std::string::npos) dim = 1;  // columns (row-parallel in vLLM's terms)
  if (dim < 0 || ranks == 1) return r;
  const uint64_t n = shape[dim], per = (n + ranks - 1) / ranks;  // uneven on purpose where n is odd
  const uint64_t lo = std::min<uint64_t>(n, rank * per), hi = std::min<uint64_t>(n, lo + per);
  r.start[dim] = lo;
  r.shape[dim] = hi - lo;
  return r;
}

inline RankShard shard_of(const LiveModel& m, uint32_t rank, uint32_t ranks) {
  RankShard s;
  s.rank = rank;
  s.ranks = ranks;
  for (size_t i = 0; i < m.names.size(); ++i) {
    checkpoint::Region r = rank_region(m.names[i], m.shapes[i], rank, ranks);
    const bool replicated = checkpoint::is_whole(r, m.shapes[i]);
    const uint32_t unit = checkpoint::unit_bytes(m.dtypes[i]);
    s.names.push_back(m.names[i]);
    s.dtypes.push_back(m.dtypes[i]);
    s.saved.push_back(!replicated || rank == 0 || ranks == 1);
    s.bufs.emplace_back(checkpoint::region_units(r) * unit);
    checkpoint::region_transfer(m.data[i].data(), checkpoint::whole_region(m.shapes[i]), s.bufs.back().data(), r, r,
                                unit, false);
    s.regions.push_back(std::move(r));
  }
  return s;
}

}  // namespace livetrain::testing
