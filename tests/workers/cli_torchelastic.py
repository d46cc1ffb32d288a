"""Write torch.distributed.is_torchelastic_launched() to --out-file (torch's test_script_is_torchelastic_launched)."""
import argparse

import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--out-file")
args = parser.parse_args()
with open(args.out_file, "w") as out:
    out.write(str(dist.is_torchelastic_launched()))
