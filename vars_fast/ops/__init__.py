"""Custom ops. Each public function dispatches (see ``_dispatch``) to Triton, the compiled
extension (CPU / CUDA kernels) or the pure-PyTorch reference, which is the spec."""
from vars_fast.ops.pgd_step import pgd_step
from vars_fast.ops.residual_epilogue import residual_epilogue
from vars_fast.ops.random_resize_pad import random_resize_pad
from vars_fast.ops.info_nce import info_nce
from vars_fast.ops.memory import cpu_block_cache, cpu_block_cache_stats

__all__ = ["pgd_step", "residual_epilogue", "random_resize_pad", "info_nce", "cpu_block_cache", "cpu_block_cache_stats"]
