"""The hello-world worker: one line per rank, no torch, so the figures are the launchers'."""
import os

print(f"hello from rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}", flush=True)
