"""Write a line in two parts, pausing mid-line until <go file> exists (a progress bar)."""
import os
import sys
import time

sys.stdout.write("progress 50%")
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print(" done")
