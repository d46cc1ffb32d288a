"""A torch worker for the single binary's tests: all-reduce rank + 1 over gloo and record what it saw.

    bin_allreduce.py DIR      writes DIR/<RANK>.json: the sum, the world size and the interpreter
"""
import json
import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
record = {"sum": total.item(), "world_size": dist.get_world_size(), "python": sys.executable}
with open(os.path.join(sys.argv[1], f"{os.environ['RANK']}.json"), "w") as out:
    json.dump(record, out)
dist.destroy_process_group()
