// Input checks shared by the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels, so both
// devices reject bad input with the same message. The fake kernels in vars_fast/ops/*.py check
// the same shapes, dtypes and devices with torch._check, so traced code fails the same way.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace vars_fast {

// ---- pgd_step ------------------------------------------------------------------------------
inline void check_pgd_step_inputs(const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                                  const std::optional<at::Tensor>& alpha_t, const std::optional<at::Tensor>& eps_t) {
  TORCH_CHECK(x_orig.sizes() == x_adv.sizes() && grad.sizes() == x_adv.sizes(), "vars_fast::pgd_step: x_adv ",
              x_adv.sizes(), ", x_orig ", x_orig.sizes(), " and grad ", grad.sizes(), " must have the same shape");
  TORCH_CHECK(x_orig.scalar_type() == x_adv.scalar_type() && grad.scalar_type() == x_adv.scalar_type(),
              "vars_fast::pgd_step: x_adv, x_orig and grad must share one dtype");
  TORCH_CHECK(x_orig.device() == x_adv.device() && grad.device() == x_adv.device(),
              "vars_fast::pgd_step: x_adv, x_orig and grad must be on one device");
  TORCH_CHECK(x_adv.dim() >= 1, "vars_fast::pgd_step: inputs need a leading batch dimension");
  for (const auto* t : {&alpha_t, &eps_t}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == at::kFloat && (*t)->dim() == 1 && (*t)->numel() == x_adv.size(0) &&
                      (*t)->device() == x_adv.device(),
                  "vars_fast::pgd_step: per-sample alpha/eps must be float32 [B] on x's device, B = ", x_adv.size(0));
    }
  }
}

// ---- random_resize_pad ---------------------------------------------------------------------
enum class ResizeMode { Bilinear, Nearest };

inline ResizeMode parse_resize_mode(c10::string_view mode) {
  if (mode == "bilinear") return ResizeMode::Bilinear;
  TORCH_CHECK(mode == "nearest", "vars_fast::random_resize_pad: mode must be 'bilinear' or 'nearest', got '",
              std::string(mode), "'");
  return ResizeMode::Nearest;
}

// `t` is x (forward) or grad_out (backward): both lead with [B, C]. Only shapes, dtypes and
// devices are checked here; the CPU kernel also checks that each draw fits the canvas (on the
// GPU that would cost a sync, and the CUDA kernels clamp their indices instead).
inline void check_resize_draws(const at::Tensor& t, const at::Tensor& sizes, const at::Tensor& offsets) {
  const int64_t B = t.size(0);
  TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == B && sizes.scalar_type() == at::kLong &&
                  sizes.device() == t.device(),
              "vars_fast::random_resize_pad: sizes must be int64 [B=", B, "] on ", t.device(), ", got ",
              sizes.sizes(), " ", sizes.scalar_type(), " on ", sizes.device());
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == B && offsets.size(1) == 2 &&
                  offsets.scalar_type() == at::kLong && offsets.device() == t.device(),
              "vars_fast::random_resize_pad: offsets must be int64 [B=", B, ", 2] on ", t.device(), ", got ",
              offsets.sizes(), " ", offsets.scalar_type(), " on ", offsets.device());
}

// ---- residual_epilogue ---------------------------------------------------------------------
// True for batch norm, false for instance norm.
inline bool parse_norm(c10::string_view norm) {
  TORCH_CHECK(norm == "instance" || norm == "batch",
              "vars_fast::residual_epilogue: norm must be 'instance' or 'batch', got '", std::string(norm), "'");
  return norm == "batch";
}

// ---- info_nce ------------------------------------------------------------------------------
inline void check_info_nce_inputs(const at::Tensor& a, const at::Tensor& c, const at::Tensor& pos,
                                  const at::Tensor& ag, const at::Tensor& cg) {
  TORCH_CHECK(a.dim() == 2 && c.dim() == 2 && a.size(1) == c.size(1), "vars_fast::info_nce: anchors [N, d] ",
              a.sizes(), " and candidates [M, d] ", c.sizes(), " must share d");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == a.size(0) && ag.dim() == 1 && ag.size(0) == a.size(0),
              "vars_fast::info_nce: positive_index ", pos.sizes(), " and anchor_group ", ag.sizes(),
              " must be [N] with N = ", a.size(0));
  TORCH_CHECK(cg.dim() == 1 && cg.size(0) == c.size(0), "vars_fast::info_nce: candidate_group ", cg.sizes(),
              " must be [M] with M = ", c.size(0));
  TORCH_CHECK(a.is_floating_point() && a.scalar_type() == c.scalar_type(),
              "vars_fast::info_nce: anchors and candidates must share one floating dtype");
  for (const auto* t : {&c, &pos, &ag, &cg}) {
    TORCH_CHECK(t->device() == a.device(), "vars_fast::info_nce: all inputs must be on one device");
  }
}

}  // namespace vars_fast
