// The two pgd_step entry points, shared by the CPU (csrc/cpu/pgd_step.cpp) and CUDA
// (csrc/cuda/pgd_step.cu) kernels: each device supplies only `Launch`, which writes
// clamp01(clamp(x_adv + alpha * sign(grad), x_orig +- eps)) into `out` for contiguous inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common.h"

namespace vars_fast {

using PgdStepLaunch = void (*)(at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_orig,
                               const at::Tensor& grad, const std::optional<at::Tensor>& alpha_t,
                               const std::optional<at::Tensor>& eps_t, double alpha, double eps);

template <PgdStepLaunch Launch>
at::Tensor pgd_step_out_of_place(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                                 const std::optional<at::Tensor>& alpha_t, const std::optional<at::Tensor>& eps_t,
                                 double alpha, double eps) {
  check_pgd_step_inputs(x_adv, x_orig, grad, alpha_t, eps_t);
  auto xa = x_adv.contiguous(), x0 = x_orig.contiguous(), g = grad.contiguous();
  auto out = at::empty_like(xa, at::MemoryFormat::Contiguous);
  Launch(out, xa, x0, g, alpha_t, eps_t, alpha, eps);
  return out;
}

// Reading and writing the same element in one pass is safe: each output depends only on the
// same index of the inputs, so `Launch` may write into x_adv.
template <PgdStepLaunch Launch>
void pgd_step_in_place(at::Tensor x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                       const std::optional<at::Tensor>& alpha_t, const std::optional<at::Tensor>& eps_t, double alpha,
                       double eps) {
  check_pgd_step_inputs(x_adv, x_orig, grad, alpha_t, eps_t);
  TORCH_CHECK(x_adv.is_contiguous(), "vars_fast::pgd_step_: in-place update needs a contiguous x_adv "
              "(call pgd_step(..., inplace=False) or x_adv.contiguous())");
  auto x0 = x_orig.contiguous(), g = grad.contiguous();
  Launch(x_adv, x_adv, x0, g, alpha_t, eps_t, alpha, eps);
}

}  // namespace vars_fast
