"""Triton kernels, one module per op family, each registering ``vars_fast::<op>_triton*`` with
``torch.library.triton_op`` (kernels launched through ``wrap_triton``) so torch.compile traces
into them without graph breaks.

These modules import triton at import time; ``vars_fast.ops._dispatch.triton_module`` imports
them lazily, only when a call may run on Triton (CUDA tensors, or TRITON_INTERPRET=1, which
must be set before the first import: ``triton.jit`` decides interpreter vs compiler when a
kernel is decorated).
"""
