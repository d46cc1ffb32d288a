"""A small, real DDP training job on synthetic data.

Every rank fits the same linear target with a small MLP on its own shard of
random data; DDP averages the gradients. gloo on CPU, nccl when CUDA is
present. Rank 0 prints the loss curve and the final loss; at the end every
rank checks that its parameters equal rank 0's and exits 1 if they do not.

    launcher --standalone --nproc-per-node=2 examples/train.py --steps 300
"""
import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)

    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(42)).to(device)
    shard = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    losses = []
    started = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(args.batch, 32, generator=shard).to(device)
        y = x @ target + 0.01 * torch.randn(args.batch, 1, generator=shard).to(device)
        loss = F.mse_loss(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - started

    # Equal parameters everywhere: the extremes of a checksum across ranks coincide.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    checksum = (flat * torch.arange(1, flat.numel() + 1, device=device, dtype=torch.float64)).sum()
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    in_sync = bool(low == high)

    if rank == 0:
        marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
        curve = ", ".join(f"step {i}: {losses[i]:.4f}" for i in marks)
        print(f"trained {args.steps} steps on {world_size} ranks ({dist.get_backend()}) in {elapsed:.2f} s")
        print(f"loss curve: {curve}")
        print(f"final loss: {losses[-1]:.6f}")
        print(f"parameters identical on all ranks: {in_sync}")
    if not in_sync:
        print(f"rank {rank}: parameters differ from rank 0's (checksum {checksum.item()!r})", file=sys.stderr)
    # DDP's hooks on the parameters keep the process group alive; if it is still
    # alive when the interpreter exits, its gloo threads can abort the process.
    del ddp, optimizer, model, flat
    gc.collect()
    dist.destroy_process_group()
    return 0 if in_sync else 1


if __name__ == "__main__":
    sys.exit(main())
