"""A worker without @record: 30 numbered lines (one redrawn like a progress bar) on stderr, then exit 1."""
import sys

for n in range(1, 31):
    if n == 25:
        sys.stderr.write("progress 10%\rprogress 50%\rprogress 100%\n")
    else:
        print(f"stderr line {n:02d}", file=sys.stderr)
sys.exit(1)
