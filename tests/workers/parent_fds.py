"""Writes its launcher's descriptors 0, 1 and 2 (their /proc links) to DIR/<rank>.json: ``parent_fds.py DIR``."""
import json
import os
import sys

links = {fd: os.readlink(f"/proc/{os.getppid()}/fd/{fd}") for fd in (0, 1, 2)}
with open(os.path.join(sys.argv[1], f"{os.environ['RANK']}.json"), "w") as out:
    json.dump(links, out)
print("a line for the launcher's stdout")
