"""Write this worker's torchrun environment and argv to <dir>/<RANK>.json; exit with --exit-code on --fail-rank."""
import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("--fail-rank", type=int, default=-1)
parser.add_argument("--exit-code", type=int, default=1)
args, rest = parser.parse_known_args()
rank = int(os.environ["RANK"])
with open(os.path.join(args.out_dir, f"{rank}.json"), "w") as out:
    json.dump({"env": dict(os.environ), "argv": sys.argv[1:], "pid": os.getpid()}, out)
if rank == args.fail_rank:
    print(f"rank {rank} failing on purpose", file=sys.stderr)
    sys.exit(args.exit_code)
