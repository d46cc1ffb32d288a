"""Record how this worker was started: $CLI_RECORD_DIR/<RANK>.json with argv, __name__ and the launch environment."""
import json
import os
import sys

RECORDED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")

with open(os.path.join(os.environ["CLI_RECORD_DIR"], f"{os.environ['RANK']}.json"), "w") as out:
    json.dump({"argv": sys.argv, "name": __name__, "env": {k: os.environ.get(k) for k in RECORDED}}, out)
