"""Each rank writes its pid to DIR/<rank>.pid, then sleeps for ever: ``hang_sleeper.py DIR``."""
import os
import sys
import time


def sleep_for_ever():
    while True:
        time.sleep(1)


directory = sys.argv[1]
rank = os.environ["RANK"]
with open(os.path.join(directory, f"{rank}.tmp"), "w") as out:
    out.write(str(os.getpid()))
os.rename(os.path.join(directory, f"{rank}.tmp"), os.path.join(directory, f"{rank}.pid"))
sleep_for_ever()
