"""A gloo job whose rank 1 fails in attempt 0; attempt 1 must start from a clean store.

Attempt 0 all-reduces, leaves a marker key in the workers' store, then rank 1
exits 1. Attempt 1 checks the marker is gone, all-reduces again and writes
<dir>/attempt1_<rank> with the result.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

out_dir = sys.argv[1]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
total = torch.tensor([rank + 1])
dist.all_reduce(total)
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                      timeout=timedelta(seconds=30))
if attempt == 0:
    store.set(f"attempt0_marker_{rank}", "stale")
    dist.barrier()
    if rank == 1:
        sys.exit(1)
    dist.barrier()  # rank 1 is gone: the agent tears this rank down
    sys.exit(0)
stale = [key for key in (f"attempt0_marker_{r}" for r in range(world)) if store.check([key])]
with open(os.path.join(out_dir, f"attempt{attempt}_{rank}"), "w") as out:
    out.write(f"sum={int(total)} stale={stale}\n")
dist.destroy_process_group()
sys.exit(1 if stale else 0)
