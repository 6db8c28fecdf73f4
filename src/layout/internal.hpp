// Internal: what plan.cpp shares with views.cpp.
#pragma once

#include "livetrain/layout.hpp"

namespace livetrain::layout {

Plan plan_with_prefixes(const ModelInfo& info, const Options& options, const Prefixes& engine_prefixes);
Prefixes implied_engine_prefixes(const ModelInfo& info, Engine engine);

}  // namespace livetrain::layout
