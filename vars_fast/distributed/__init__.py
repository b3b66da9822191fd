"""Scale-out helpers: torchrun data parallelism (ddp.py)."""
