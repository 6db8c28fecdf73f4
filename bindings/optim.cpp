// Bindings: one optimizer step on one parameter. Tensors cross as raw addresses (torch's data_ptr())
// with dtype and sizes, so a step costs a couple of microseconds of Python; python/livetrain/optim.py
// owns the tensors and checks devices, dtypes and shapes before calling.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "livetrain/error.hpp"
#include "livetrain/optim.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// An ApolloStep from addresses and sizes; the workspace is set by the caller.
optim::ApolloStep apollo_step_of(uintptr_t weight, const std::string& weight_dtype, int64_t ld_weight, uintptr_t grad,
                                 const std::string& grad_dtype, int64_t rows, int64_t cols, uintptr_t m, uintptr_t v,
                                 uintptr_t prev, uintptr_t status, uintptr_t step, uint64_t seed,
                                 const optim::ApolloHyper& h) {
  optim::ApolloStep s;
  s.weight = ptr<void>(weight);
  s.weight_dtype = parse_dtype(weight_dtype);
  s.ld_weight = ld_weight;
  s.grad = ptr<const void>(grad);
  s.grad_dtype = parse_dtype(grad_dtype);
  s.rows = rows;
  s.cols = cols;
  s.m = ptr<float>(m);
  s.v = ptr<float>(v);
  s.prev_norm = ptr<float>(prev);
  s.status = ptr<int32_t>(status);
  s.step = ptr<uint64_t>(step);
  s.seed = seed;
  s.hyper = h;
  return s;
}

// A shard from Python: (dim, full size along dim, [(start, length), ...], primary); None: the whole tensor.
using ShardArg = std::optional<std::tuple<int32_t, int64_t, std::vector<std::pair<int64_t, int64_t>>, bool>>;

optim::Shard shard_of(const ShardArg& arg) {
  optim::Shard sh;
  if (!arg) return sh;
  const auto& [dim, full, segments, primary] = *arg;
  if (segments.empty() || segments.size() > static_cast<size_t>(optim::kMaxShardSegments)) {
    throw Error(ErrorCode::kInvalidArg, "optimizer shard: 1 to " + std::to_string(optim::kMaxShardSegments) +
                                            " segments, got " + std::to_string(segments.size()));
  }
  sh.dim = dim;
  sh.full = full;
  sh.segments = static_cast<int32_t>(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) sh.segment[i] = {segments[i].first, segments[i].second};
  sh.primary = primary;
  return sh;
}

// The hyperparameters APOLLO and AdamW share, bound under the same names.
template <typename H>
nb::class_<H>& def_common_hyper(nb::class_<H>& c) {
  return c.def(nb::init<>())
      .def_rw("lr", &H::lr)
      .def_rw("beta1", &H::beta1)
      .def_rw("beta2", &H::beta2)
      .def_rw("eps", &H::eps)
      .def_rw("weight_decay", &H::weight_decay)
      .def_rw("max_grad_norm", &H::max_grad_norm)
      .def_rw("rounding", &H::rounding);
}

// The AdamWStep of one contiguous parameter from the bindings' arguments (adamw_step, adamw_step_many).
optim::AdamWStep adamw_step_of(uintptr_t weight, const std::string& weight_dtype, uintptr_t grad,
                               const std::string& grad_dtype, int64_t numel, uintptr_t m, uintptr_t v, uintptr_t status,
                               uintptr_t step, uint64_t seed, const optim::AdamWHyper& h) {
  optim::AdamWStep s;
  s.weight = ptr<void>(weight);
  s.weight_dtype = parse_dtype(weight_dtype);
  s.grad = ptr<const void>(grad);
  s.grad_dtype = parse_dtype(grad_dtype);
  s.numel = numel;
  s.m = ptr<float>(m);
  s.v = ptr<float>(v);
  s.status = ptr<int32_t>(status);
  s.step = ptr<uint64_t>(step);
  s.seed = seed;
  s.hyper = h;
  return s;
}

// The steps of a batch whose parameters stay the same from one optimizer step to the next (step() over the
// same parameters, the backward hooks' batches): converted from Python once, so that a step passes only what
// changes, the gradients' addresses and each hyperparameter group's learning rate and weight decay. Steps of
// many small tensors then cost one call, not microseconds of Python and conversion per tensor.
template <typename Step>
struct StepBatch {
  std::vector<Step> steps;
  std::vector<size_t> groups;  // each step's hyperparameter group: its index into run()'s lr and weight_decay

  // The per-step arguments into the steps, checked before anything runs.
  void refresh(const std::vector<uintptr_t>& grads, const std::vector<float>& lr,
               const std::vector<float>& weight_decay) {
    if (grads.size() != steps.size())
      throw Error(ErrorCode::kInvalidArg, "optimizer batch: " + std::to_string(steps.size()) + " steps, got " +
                                              std::to_string(grads.size()) + " gradients");
    if (lr.size() != weight_decay.size())
      throw Error(ErrorCode::kInvalidArg, "optimizer batch: one learning rate and one weight decay per group");
    for (size_t i = 0; i < steps.size(); ++i) {
      if (groups[i] >= lr.size())
        throw Error(ErrorCode::kInvalidArg, "optimizer batch: step " + std::to_string(i) + " is in group " +
                                                std::to_string(groups[i]) + ", got " + std::to_string(lr.size()) +
                                                " groups' learning rates");
      steps[i].grad = ptr<const void>(grads[i]);
      steps[i].hyper.lr = lr[groups[i]];
      steps[i].hyper.weight_decay = weight_decay[groups[i]];
    }
  }
};

using ApolloItem = std::tuple<uintptr_t, std::string, int64_t, std::string, int64_t, int64_t, uintptr_t, uintptr_t,
                              uintptr_t, uintptr_t, uintptr_t, uint64_t, const optim::ApolloHyper*>;
using AdamWItem = std::tuple<uintptr_t, std::string, std::string, int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                             uint64_t, const optim::AdamWHyper*>;

optim::ApolloStep apollo_item_step(const ApolloItem& item, uintptr_t grad) {
  const auto& [weight, wdt, ld, gdt, rows, cols, m_, v_, prev, status, step, seed, h] = item;
  if (!h) throw Error(ErrorCode::kInvalidArg, "optimizer step: an item has no hyperparameters");
  return apollo_step_of(weight, wdt, ld, grad, gdt, rows, cols, m_, v_, prev, status, step, seed, *h);
}

optim::AdamWStep adamw_item_step(const AdamWItem& item, uintptr_t grad) {
  const auto& [weight, wdt, gdt, numel, m_, v_, status, step, seed, h] = item;
  if (!h) throw Error(ErrorCode::kInvalidArg, "optimizer step: an item has no hyperparameters");
  return adamw_step_of(weight, wdt, grad, gdt, numel, m_, v_, status, step, seed, *h);
}

// A StepBatch bound as `name`: built from apollo_step_many's or adamw_step_many's items and each item's group,
// run on CUDA (the batched launches) or on the CPU (each step alone, the reference).
template <typename Step, typename Item>
void def_step_batch(nb::module_& m, const char* name, Step (*of)(const Item&, uintptr_t),
                    void (*cuda)(const Step*, int, void*, size_t, void*), void (*cpu)(const Step*, int),
                    const char* doc) {
  using Batch = StepBatch<Step>;
  nb::class_<Batch>(m, name, doc)
      .def(
          "__init__",
          [of](Batch* self, const std::vector<Item>& items, const std::vector<size_t>& groups) {
            if (groups.size() != items.size())
              throw Error(ErrorCode::kInvalidArg, "optimizer batch: one group per item");
            Batch batch;  // built whole before the object exists: a bad item leaves nothing half-made
            batch.steps.reserve(items.size());
            for (const Item& item : items) batch.steps.push_back(of(item, 0));
            batch.groups = groups;
            new (self) Batch(std::move(batch));
          },
          nb::arg("items"), nb::arg("groups"))
      .def("__len__", [](const Batch& self) { return self.steps.size(); })
      .def(
          "run",
          [cuda, cpu](Batch& self, const std::vector<uintptr_t>& grads, const std::vector<float>& lr,
                      const std::vector<float>& weight_decay, uintptr_t workspace, size_t workspace_bytes, bool on_cuda,
                      uintptr_t stream) {
            self.refresh(grads, lr, weight_decay);
            nb::gil_scoped_release release;
            if (on_cuda)
              cuda(self.steps.data(), static_cast<int>(self.steps.size()), ptr<void>(workspace), workspace_bytes,
                   reinterpret_cast<void*>(stream));
            else cpu(self.steps.data(), static_cast<int>(self.steps.size()));
          },
          nb::arg("grads"), nb::arg("lr"), nb::arg("weight_decay"), nb::arg("workspace"), nb::arg("workspace_bytes"),
          nb::arg("cuda"), nb::arg("stream"),
          "One step of every parameter of the batch: their gradients' addresses (in the items' order), each "
          "group's learning rate and weight decay; on CUDA in the workspace (zero-filled before first use) on "
          "`stream`, else on the CPU.");
}

}  // namespace

void init_optim(nb::module_& m) {
  nb::enum_<optim::Rounding>(m, "Rounding")
      .value("stochastic", optim::Rounding::kStochastic)
      .value("nearest", optim::Rounding::kNearest);
  nb::enum_<optim::Scaling>(m, "Scaling")
      .value("channel", optim::Scaling::kChannel)
      .value("tensor", optim::Scaling::kTensor);

  nb::class_<optim::ApolloHyper> apollo(m, "ApolloHyper", "Hyperparameters of an APOLLO step (see docs/optim.md).");
  def_common_hyper(apollo)
      .def_rw("rank", &optim::ApolloHyper::rank)
      .def_rw("update_proj_gap", &optim::ApolloHyper::update_proj_gap)
      .def_rw("scale", &optim::ApolloHyper::scale)
      .def_rw("scaling", &optim::ApolloHyper::scaling)
      .def_rw("limiter", &optim::ApolloHyper::limiter);

  nb::class_<optim::AdamWHyper> adamw(m, "AdamWHyper", "Hyperparameters of an AdamW step.");
  def_common_hyper(adamw);

  m.def("apollo_workspace_bytes", &optim::apollo_workspace_bytes, nb::arg("rows"), nb::arg("cols"), nb::arg("rank"));
  m.def("adamw_workspace_bytes", &optim::adamw_workspace_bytes, nb::arg("numel"));

  m.def(
      "apollo_step",
      [](uintptr_t weight, const std::string& weight_dtype, int64_t ld_weight, uintptr_t grad,
         const std::string& grad_dtype, int64_t rows, int64_t cols, uintptr_t m_, uintptr_t v_, uintptr_t prev,
         uintptr_t status, uintptr_t step, uint64_t seed, uintptr_t workspace, const optim::ApolloHyper& h, bool cuda,
         uintptr_t stream) {
        optim::ApolloStep s = apollo_step_of(weight, weight_dtype, ld_weight, grad, grad_dtype, rows, cols, m_, v_,
                                             prev, status, step, seed, h);
        s.workspace = ptr<void>(workspace);
        nb::gil_scoped_release release;
        if (cuda) optim::apollo_step_cuda(s, reinterpret_cast<void*>(stream));
        else optim::apollo_step_cpu(s);
      },
      "One APOLLO step on a matrix (addresses of weight, grad, m, v, prev_norm, status, step, workspace).");

  nb::enum_<optim::ApolloPhase>(m, "ApolloPhase")
      .value("project", optim::ApolloPhase::kProject)
      .value("moments", optim::ApolloPhase::kMoments)
      .value("update", optim::ApolloPhase::kUpdate);

  m.def(
      "apollo_phase_layout",
      [](int64_t rows, int64_t cols, int32_t rank, const ShardArg& shard) {
        optim::ApolloStep s;
        s.rows = rows;
        s.cols = cols;
        s.hyper.rank = rank;
        s.shard = shard_of(shard);
        const optim::ApolloReduce r = optim::apollo_reduce_layout(s);
        return std::make_tuple(optim::apollo_phase_workspace_bytes(s), r.first_offset, r.first_count, r.second_offset,
                               r.second_count);
      },
      nb::arg("rows"), nb::arg("cols"), nb::arg("rank"), nb::arg("shard").none(),
      "(workspace bytes, first offset, first count, second offset, second count) of a step in phases on this "
      "rank's [rows, cols] part: the floats of the workspace to sum over ranks after each of the first two phases.");

  m.def(
      "apollo_phase",
      [](optim::ApolloPhase phase, uintptr_t weight, const std::string& weight_dtype, int64_t ld_weight, uintptr_t grad,
         const std::string& grad_dtype, int64_t rows, int64_t cols, uintptr_t m_, uintptr_t v_, uintptr_t prev,
         uintptr_t status, uintptr_t step, uint64_t seed, uintptr_t workspace, const optim::ApolloHyper& h,
         const ShardArg& shard, bool cuda, uintptr_t stream) {
        optim::ApolloStep s = apollo_step_of(weight, weight_dtype, ld_weight, grad, grad_dtype, rows, cols, m_, v_,
                                             prev, status, step, seed, h);
        s.workspace = ptr<void>(workspace);
        s.shard = shard_of(shard);
        nb::gil_scoped_release release;
        if (cuda) optim::apollo_phase_cuda(s, phase, reinterpret_cast<void*>(stream));
        else optim::apollo_phase_cpu(s, phase);
      },
      nb::arg("phase"), nb::arg("weight"), nb::arg("weight_dtype"), nb::arg("ld_weight"), nb::arg("grad"),
      nb::arg("grad_dtype"), nb::arg("rows"), nb::arg("cols"), nb::arg("m"), nb::arg("v"), nb::arg("prev_norm"),
      nb::arg("status"), nb::arg("step"), nb::arg("seed"), nb::arg("workspace"), nb::arg("hyper"),
      nb::arg("shard").none(), nb::arg("cuda"), nb::arg("stream"),
      "One phase of an APOLLO step on a tensor-parallel rank's part of a matrix (apollo_phase_layout says what "
      "to sum over ranks between phases).");

  m.def(
      "apollo_step_many",
      [](const std::vector<ApolloItem>& items, const std::vector<uintptr_t>& grads, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        if (items.size() != grads.size())
          throw Error(ErrorCode::kInvalidArg, "apollo_step_many: one gradient per item");
        std::vector<optim::ApolloStep> steps(items.size());
        for (size_t i = 0; i < items.size(); ++i) steps[i] = apollo_item_step(items[i], grads[i]);
        nb::gil_scoped_release release;
        optim::apollo_step_many_cuda(steps.data(), static_cast<int>(steps.size()), ptr<void>(workspace),
                                     workspace_bytes, reinterpret_cast<void*>(stream));
      },
      "APOLLO steps of many matrices on CUDA, batched (items: weight, weight dtype, ld, grad dtype, rows, cols, "
      "m, v, prev_norm, status, step, seed, hyper; grads: their gradients' addresses).");

  m.def(
      "apollo_many_workspace_bytes",
      [](const std::vector<std::tuple<int64_t, int64_t, int32_t>>& shapes) {
        size_t total = 0;
        for (const auto& [rows, cols, rank] : shapes) total += optim::apollo_workspace_bytes(rows, cols, rank);
        return total;
      },
      "Workspace bytes of apollo_step_many for (rows, cols, rank) items.");

  m.def(
      "adamw_step",
      [](uintptr_t weight, const std::string& weight_dtype, uintptr_t grad, const std::string& grad_dtype,
         int64_t numel, uintptr_t m_, uintptr_t v_, uintptr_t status, uintptr_t step, uint64_t seed,
         uintptr_t workspace, const optim::AdamWHyper& h, bool cuda, uintptr_t stream, const ShardArg& shard,
         int64_t inner, uintptr_t total_sq) {
        optim::AdamWStep s =
            adamw_step_of(weight, weight_dtype, grad, grad_dtype, numel, m_, v_, status, step, seed, h);
        s.workspace = ptr<void>(workspace);
        s.shard = shard_of(shard);
        s.inner = inner;
        s.total_sq = ptr<const float>(total_sq);
        nb::gil_scoped_release release;
        if (cuda) optim::adamw_step_cuda(s, reinterpret_cast<void*>(stream));
        else optim::adamw_step_cpu(s);
      },
      nb::arg("weight"), nb::arg("weight_dtype"), nb::arg("grad"), nb::arg("grad_dtype"), nb::arg("numel"),
      nb::arg("m"), nb::arg("v"), nb::arg("status"), nb::arg("step"), nb::arg("seed"), nb::arg("workspace"),
      nb::arg("hyper"), nb::arg("cuda"), nb::arg("stream"), nb::arg("shard").none() = nb::none(), nb::arg("inner") = 1,
      nb::arg("total_sq") = 0,
      "One AdamW step on a contiguous parameter (or a tensor-parallel rank's part of one: shard, inner, and "
      "total_sq, the address of ‖G‖² summed over the ranks).");

  m.def(
      "adamw_step_many",
      [](const std::vector<AdamWItem>& items, const std::vector<uintptr_t>& grads, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        if (items.size() != grads.size()) throw Error(ErrorCode::kInvalidArg, "adamw_step_many: one gradient per item");
        std::vector<optim::AdamWStep> steps(items.size());
        for (size_t i = 0; i < items.size(); ++i) steps[i] = adamw_item_step(items[i], grads[i]);
        nb::gil_scoped_release release;
        optim::adamw_step_many_cuda(steps.data(), static_cast<int>(steps.size()), ptr<void>(workspace), workspace_bytes,
                                    reinterpret_cast<void*>(stream));
      },
      "AdamW steps of many contiguous parameters on CUDA, batched (items: weight, weight dtype, grad dtype, numel, "
      "m, v, status, step, seed, hyper; grads: their gradients' addresses).");

  m.def(
      "adamw_many_workspace_bytes",
      [](const std::vector<int64_t>& numels) {
        std::vector<optim::AdamWStep> steps(numels.size());
        for (size_t i = 0; i < numels.size(); ++i) steps[i].numel = numels[i];
        return optim::adamw_many_workspace_bytes(steps.data(), static_cast<int>(steps.size()));
      },
      "Workspace bytes of adamw_step_many for parameters of these sizes.");

  def_step_batch<optim::ApolloStep, ApolloItem>(
      m, "ApolloBatch", apollo_item_step, optim::apollo_step_many_cuda, optim::apollo_step_many_cpu,
      "The APOLLO steps of a fixed set of matrices (items as apollo_step_many's, each with its group's index), "
      "converted once: run() takes the gradients' addresses and the groups' learning rates and weight decays.");
  def_step_batch<optim::AdamWStep, AdamWItem>(
      m, "AdamWBatch", adamw_item_step, optim::adamw_step_many_cuda, optim::adamw_step_many_cpu,
      "The AdamW steps of a fixed set of contiguous tensors (items as adamw_step_many's, each with its group's "
      "index), converted once: run() takes the gradients' addresses and the groups' learning rates and weight "
      "decays.");

  m.def(
      "adamw_sumsq",
      [](uintptr_t grad, const std::string& grad_dtype, int64_t numel, uintptr_t out, uintptr_t workspace, bool cuda,
         uintptr_t stream) {
        const DType dt = parse_dtype(grad_dtype);
        nb::gil_scoped_release release;
        if (cuda)
          optim::adamw_sumsq_cuda(ptr<const void>(grad), dt, numel, ptr<float>(out), ptr<void>(workspace),
                                  reinterpret_cast<void*>(stream));
        else optim::adamw_sumsq_cpu(ptr<const void>(grad), dt, numel, ptr<float>(out));
      },
      "out[0] ← ‖G‖² of a contiguous gradient (a tensor-parallel rank's part of AdamW's total_sq).");

  m.def(
      "apollo_projection",
      [](uintptr_t out, int64_t rows, int64_t cols, int32_t rank, uint64_t seed, uint64_t step, int32_t gap) {
        nb::gil_scoped_release release;
        optim::apollo_projection(ptr<float>(out), rows, cols, rank, seed, step, gap);
      },
      "Writes the projection P a step uses into float32 memory at `out` (CPU).");
}

}  // namespace livetrain::bindings
