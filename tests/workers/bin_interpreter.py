"""Record which interpreter runs this worker: DIR/<RANK>.python holds its sys.executable.

    bin_interpreter.py DIR
"""
import os
import sys

with open(os.path.join(sys.argv[1], f"{os.environ['RANK']}.python"), "w") as out:
    out.write(sys.executable)
