"""Rank 1 ignores SIGTERM and waits for ever; rank 0 exits 3 once rank 1 is ready: ``hang_ignore_term.py DIR``."""
import os
import signal
import sys
import time


def ignore_sigterm_and_wait(directory):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(directory, "1.ready"), "w"):
        pass
    while True:
        time.sleep(1)


def main(directory):
    if os.environ["RANK"] == "1":
        ignore_sigterm_and_wait(directory)
    while not os.path.exists(os.path.join(directory, "1.ready")):
        time.sleep(0.01)
    sys.exit(3)


main(sys.argv[1])
