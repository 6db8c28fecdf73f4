// Bindings: the loss's two row-wise passes over a block of logits (include/livetrain/loss.hpp). Tensors
// cross as raw addresses; python/livetrain/loss.py owns them and checks devices, dtypes and strides.
#include <nanobind/stl/string.h>

#include <string>

#include "bindings.hpp"
#include "livetrain/error.hpp"
#include "livetrain/loss.hpp"

namespace nb = nanobind;

namespace livetrain::bindings {

namespace {

loss::Logits logits_of(uintptr_t data, const std::string& dtype, int64_t rows, int64_t cols, int64_t ld) {
  loss::Logits x;
  x.data = reinterpret_cast<void*>(data);
  x.dtype = parse_dtype(dtype);
  x.rows = rows;
  x.cols = cols;
  x.ld = ld;
  return x;
}

}  // namespace

void init_loss(nb::module_& m) {
  m.def(
      "ce_logsumexp_rows",
      [](uintptr_t data, const std::string& dtype, int64_t rows, int64_t cols, int64_t ld, uintptr_t lse, bool cuda,
         uintptr_t stream) {
        loss::Logits x = logits_of(data, dtype, rows, cols, ld);
        nb::gil_scoped_release release;
        if (cuda) loss::logsumexp_rows_cuda(x, reinterpret_cast<float*>(lse), reinterpret_cast<void*>(stream));
        else loss::logsumexp_rows_cpu(x, reinterpret_cast<float*>(lse));
      },
      nb::arg("data"), nb::arg("dtype"), nb::arg("rows"), nb::arg("cols"), nb::arg("ld"), nb::arg("lse"),
      nb::arg("cuda"), nb::arg("stream"),
      "lse[i] <- log(exp(lse[i]) + sum_j exp(x[i, j])) over a [rows, cols] block of BF16/F32 logits (row stride ld).");
  m.def(
      "ce_softmax_grad_rows",
      [](uintptr_t data, const std::string& dtype, int64_t rows, int64_t cols, int64_t ld, uintptr_t lse,
         uintptr_t target, int64_t col0, uintptr_t scale, bool cuda, uintptr_t stream) {
        loss::Logits x = logits_of(data, dtype, rows, cols, ld);
        auto l = reinterpret_cast<const float*>(lse);
        auto t = reinterpret_cast<const int64_t*>(target);
        auto s = reinterpret_cast<const float*>(scale);
        nb::gil_scoped_release release;
        if (cuda) loss::softmax_grad_rows_cuda(x, l, t, col0, s, reinterpret_cast<void*>(stream));
        else loss::softmax_grad_rows_cpu(x, l, t, col0, s);
      },
      nb::arg("data"), nb::arg("dtype"), nb::arg("rows"), nb::arg("cols"), nb::arg("ld"), nb::arg("lse"),
      nb::arg("target"), nb::arg("col0"), nb::arg("scale"), nb::arg("cuda"), nb::arg("stream"),
      "x[i, j] <- (exp(x[i, j] - lse[i]) - [target[i] == col0 + j]) * scale[i], in place (the block's gradient).");
}

}  // namespace livetrain::bindings
