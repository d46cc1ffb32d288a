"""launcher: a torchrun-compatible launcher for PyTorch distributed jobs.

The launcher process never imports torch; its workers (the user's program) do.
"""

__version__ = "0.1.0"
TORCHRUN_COMPAT = "2.13"
# In a worker's arguments, replaced by its local rank (torchrun's macro; the legacy --local-rank=N uses it).
LOCAL_RANK_MACRO = "${local_rank}"
