// vars_fast._C: one TORCH_LIBRARY with every schema; kernels register per device key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Python (vars_fast/ops/<op>.py) adds the
// fake kernels (torch.library.register_fake) and autograd (torch.library.register_autograd).
#include <Python.h>
#include <torch/library.h>

#include "cpu/block_cache.h"

extern "C" {
// Importing vars_fast._C runs the static TORCH_LIBRARY initialisers below; the module
// itself exposes nothing (ops are reached through torch.ops.vars_fast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vars_fast, m) {
  // ---- pgd_step --------------------------------------------------------------------------------
  // x' = clamp01(clamp(x_adv + alpha * sign(grad), x_orig - eps, x_orig + eps)), math in fp32.
  // alpha_t / eps_t: optional per-sample fp32 [B] tensors (on x's device); when absent the
  // python floats alpha / eps apply to every sample. Not differentiable (optimiser update).
  m.def("pgd_step(Tensor x_adv, Tensor x_orig, Tensor grad, Tensor? alpha_t, Tensor? eps_t, "
        "float alpha, float eps) -> Tensor");
  // In-place variant: writes into x_adv; returns nothing so torch.compile can functionalise it.
  m.def("pgd_step_(Tensor(a!) x_adv, Tensor x_orig, Tensor grad, Tensor? alpha_t, Tensor? eps_t, "
        "float alpha, float eps) -> ()");

  // ---- random_resize_pad -----------------------------------------------------------------------
  // x [B,C,H,W] -> out [B,C,out_size,out_size]: sample b resized to sizes[b]^2 (bilinear with
  // align_corners=False, or nearest; F.interpolate semantics) at offsets[b] = (top, left) on
  // zeros. sizes int64 [B], offsets int64 [B,2], on x's device. mode: "bilinear" | "nearest".
  m.def("random_resize_pad(Tensor x, Tensor sizes, Tensor offsets, int out_size, str mode) -> Tensor");
  // Gradient w.r.t. x of the above: grad_out [B,C,out,out] -> grad_x [B,C,in_h,in_w].
  m.def("random_resize_pad_backward(Tensor grad_out, Tensor sizes, Tensor offsets, int in_h, int in_w, "
        "str mode) -> Tensor");

  // ---- residual_epilogue -----------------------------------------------------------------------
  // y [N,C,*] (NCHW-contiguous or channels_last): out = act(weight * (y - mean) * rstd + bias)
  // + residual. norm: "instance" (stats per (n,c), mean/rstd [N,C]) | "batch" (stats per c,
  // mean/rstd [C]). use_input_stats=false: batch-norm eval, mean/rstd come from running_mean /
  // running_var. mean/rstd are fp32 (fp64 for fp64 y) and are saved for the backward;
  // grad_residual = grad_out needs no kernel.
  m.def("residual_epilogue(Tensor y, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor? running_mean, Tensor? running_var, str norm, bool relu, bool use_input_stats, "
        "float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("residual_epilogue_backward(Tensor grad_out, Tensor y, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, str norm, bool relu, bool use_input_stats) -> (Tensor grad_y, Tensor grad_weight, "
        "Tensor grad_bias)");

  // ---- info_nce --------------------------------------------------------------------------------
  // anchors [N,d], candidates [M,d]; loss [N] (anchors' dtype) and the per-anchor log-sum-exp
  // [N] (fp32, fp64 for fp64 inputs) saved for the backward. Tiled: no N x M buffer. Groups:
  // see vars_fast/ops/info_nce.py.
  m.def("info_nce(Tensor anchors, Tensor candidates, Tensor positive_index, Tensor anchor_group, "
        "Tensor candidate_group, float temperature) -> (Tensor loss, Tensor lse)");
  m.def("info_nce_backward(Tensor grad_loss, Tensor anchors, Tensor candidates, Tensor positive_index, "
        "Tensor anchor_group, Tensor candidate_group, Tensor lse, float temperature) -> "
        "(Tensor grad_anchors, Tensor grad_candidates)");

  // ---- the opt-in CPU block cache (csrc/cpu/block_cache.h; vars_fast/ops/memory.py) -----
  // No tensor arguments: catch-all kernels registered with the schema.
  m.def("_block_cache_enable(int min_bytes, int max_cached_bytes) -> ()", &vars_fast::block_cache_enable);
  m.def("_block_cache_disable() -> ()", &vars_fast::block_cache_disable);
  m.def("_block_cache_empty() -> ()", &vars_fast::block_cache_empty);
  m.def("_block_cache_stats() -> int[]", &vars_fast::block_cache_stats);
}
