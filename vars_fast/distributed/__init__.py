"""Scale-out helpers: torchrun data parallelism (ddp.py) and the Ray Data screening engine."""
