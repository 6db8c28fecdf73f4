// Bindings: one optimizer step on one parameter. Tensors cross as raw addresses (torch's data_ptr())
// with dtype and sizes, so a step costs a couple of microseconds of Python; python/livetrain/optim.py
// owns the tensors and checks devices, dtypes and shapes before calling.
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <tuple>
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
                                 const std::string& grad_dtype, int64_t rows, int64_t cols, uintptr_t m,
                                 uintptr_t v, uintptr_t prev, uintptr_t status, uintptr_t step, uint64_t seed,
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

}  // namespace

void init_optim(nb::module_& m) {
  nb::enum_<optim::Rounding>(m, "Rounding")
      .value("stochastic", optim::Rounding::kStochastic)
      .value("nearest", optim::Rounding::kNearest);
  nb::enum_<optim::Scaling>(m, "Scaling").value("channel", optim::Scaling::kChannel).value("tensor", optim::Scaling::kTensor);

  nb::class_<optim::ApolloHyper>(m, "ApolloHyper", "Hyperparameters of an APOLLO step (see docs/optim.md).")
      .def(nb::init<>())
      .def_rw("lr", &optim::ApolloHyper::lr)
      .def_rw("beta1", &optim::ApolloHyper::beta1)
      .def_rw("beta2", &optim::ApolloHyper::beta2)
      .def_rw("eps", &optim::ApolloHyper::eps)
      .def_rw("weight_decay", &optim::ApolloHyper::weight_decay)
      .def_rw("rank", &optim::ApolloHyper::rank)
      .def_rw("update_proj_gap", &optim::ApolloHyper::update_proj_gap)
      .def_rw("scale", &optim::ApolloHyper::scale)
      .def_rw("scaling", &optim::ApolloHyper::scaling)
      .def_rw("limiter", &optim::ApolloHyper::limiter)
      .def_rw("max_grad_norm", &optim::ApolloHyper::max_grad_norm)
      .def_rw("rounding", &optim::ApolloHyper::rounding);

  nb::class_<optim::AdamWHyper>(m, "AdamWHyper", "Hyperparameters of an AdamW step.")
      .def(nb::init<>())
      .def_rw("lr", &optim::AdamWHyper::lr)
      .def_rw("beta1", &optim::AdamWHyper::beta1)
      .def_rw("beta2", &optim::AdamWHyper::beta2)
      .def_rw("eps", &optim::AdamWHyper::eps)
      .def_rw("weight_decay", &optim::AdamWHyper::weight_decay)
      .def_rw("max_grad_norm", &optim::AdamWHyper::max_grad_norm)
      .def_rw("rounding", &optim::AdamWHyper::rounding);

  m.def("apollo_workspace_bytes", &optim::apollo_workspace_bytes, nb::arg("rows"), nb::arg("cols"), nb::arg("rank"));
  m.def("adamw_workspace_bytes", &optim::adamw_workspace_bytes, nb::arg("numel"));

  m.def(
      "apollo_step",
      [](uintptr_t weight, const std::string& weight_dtype, int64_t ld_weight, uintptr_t grad,
         const std::string& grad_dtype, int64_t rows, int64_t cols, uintptr_t m_, uintptr_t v_, uintptr_t prev,
         uintptr_t status, uintptr_t step, uint64_t seed, uintptr_t workspace, const optim::ApolloHyper& h,
         bool cuda, uintptr_t stream) {
        optim::ApolloStep s = apollo_step_of(weight, weight_dtype, ld_weight, grad, grad_dtype, rows, cols, m_, v_, prev,
                                             status, step, seed, h);
        s.workspace = ptr<void>(workspace);
        nb::gil_scoped_release release;
        if (cuda) optim::apollo_step_cuda(s, reinterpret_cast<void*>(stream));
        else optim::apollo_step_cpu(s);
      },
      "One APOLLO step on a matrix (addresses of weight, grad, m, v, prev_norm, status, step, workspace).");

  m.def(
      "apollo_step_many",
      [](const std::vector<std::tuple<uintptr_t, std::string, int64_t, std::string, int64_t, int64_t, uintptr_t, uintptr_t,
                                      uintptr_t, uintptr_t, uintptr_t, uint64_t, const optim::ApolloHyper*>>& items,
         const std::vector<uintptr_t>& grads, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
        if (items.size() != grads.size()) throw Error(ErrorCode::kInvalidArg, "apollo_step_many: one gradient per item");
        std::vector<optim::ApolloStep> steps(items.size());
        for (size_t i = 0; i < items.size(); ++i) {
          const auto& [weight, wdt, ld, gdt, rows, cols, m_, v_, prev, status, step, seed, h] = items[i];
          steps[i] = apollo_step_of(weight, wdt, ld, grads[i], gdt, rows, cols, m_, v_, prev, status, step, seed, *h);
        }
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
         uintptr_t workspace, const optim::AdamWHyper& h, bool cuda, uintptr_t stream) {
        optim::AdamWStep s;
        s.weight = ptr<void>(weight);
        s.weight_dtype = parse_dtype(weight_dtype);
        s.grad = ptr<const void>(grad);
        s.grad_dtype = parse_dtype(grad_dtype);
        s.numel = numel;
        s.m = ptr<float>(m_);
        s.v = ptr<float>(v_);
        s.status = ptr<int32_t>(status);
        s.step = ptr<uint64_t>(step);
        s.seed = seed;
        s.workspace = ptr<void>(workspace);
        s.hyper = h;
        nb::gil_scoped_release release;
        if (cuda) optim::adamw_step_cuda(s, reinterpret_cast<void*>(stream));
        else optim::adamw_step_cpu(s);
      },
      "One AdamW step on a contiguous parameter.");

  m.def(
      "apollo_projection",
      [](uintptr_t out, int64_t rows, int64_t cols, int32_t rank, uint64_t seed, uint64_t step, int32_t gap) {
        nb::gil_scoped_release release;
        optim::apollo_projection(ptr<float>(out), rows, cols, rank, seed, step, gap);
      },
      "Writes the projection P a step uses into float32 memory at `out` (CPU).");
}

}  // namespace livetrain::bindings
