"""A worker without @record: 30 numbered lines on stderr, then exit 1."""
import sys

for n in range(1, 31):
    print(f"stderr line {n:02d}", file=sys.stderr)
sys.exit(1)
