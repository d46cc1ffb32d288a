"""Print N lines, each made of several separate writes (python -u writes every print() argument apart)."""
import os
import sys

rank = os.environ["RANK"]
for i in range(int(sys.argv[1])):
    print(f"rank{rank}", "x" * 100, i)
