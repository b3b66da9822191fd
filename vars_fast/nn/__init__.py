"""Model rewrites that keep a frozen model's function: BatchNorm folding, "same" padding
and polyphase convolutions, and the folded copies built from them (``fuse.py``)."""
from vars_fast.nn.fuse import (PolyphaseConv2d, SamePadConv2d, fast_copy, fold_batchnorm, folded_copy,
                               polyphase_copy, streamline)

__all__ = ["PolyphaseConv2d", "SamePadConv2d", "fast_copy", "fold_batchnorm", "folded_copy", "polyphase_copy",
           "streamline"]
