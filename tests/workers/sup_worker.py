"""A worker doing one thing the supervisor tests look at.

    sup_worker.py DIR ACTION [ARGS]

record SIGS...   handle these signals: append the name to DIR/<rank>.signals, exit 0 at the first
ignore-term      ignore SIGTERM, then wait forever
children N       start N `sleep` children in its process group, write their pids to DIR/<rank>.children, wait
orphan           start a child that outlives this worker (it exits once the FIFO DIR/release is written), then exit 0
print N          print N numbered lines and exit 0 (the last one without a newline when DIR is "partial")
segv             kill itself with SIGSEGV
exit CODE        exit with CODE
wait             wait forever
Every worker writes DIR/<rank>.ready once set up.
"""
import os
import signal
import subprocess
import sys
import time

directory, action, *args = sys.argv[1:]
rank = os.environ.get("RANK", "0")


def ready():
    with open(os.path.join(directory, f"{rank}.ready"), "w") as f:
        f.write(str(os.getpid()))


def forever():
    while True:
        signal.pause()


if action == "record":
    def on_signal(signum, frame):
        with open(os.path.join(directory, f"{rank}.signals"), "a") as f:
            f.write(signal.Signals(signum).name + "\n")
        os._exit(0)

    for name in args:
        signal.signal(signal.Signals[name], on_signal)
    ready()
    forever()
elif action == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready()
    forever()
elif action == "children":
    children = [subprocess.Popen(["sleep", "1000"]) for _ in range(int(args[0]))]
    with open(os.path.join(directory, f"{rank}.children"), "w") as f:
        f.write(" ".join(str(child.pid) for child in children))
    ready()
    forever()
elif action == "orphan":
    child = subprocess.Popen(["cat", os.path.join(directory, "release")], stdout=subprocess.DEVNULL)
    with open(os.path.join(directory, f"{rank}.orphan"), "w") as f:
        f.write(str(child.pid))
    ready()
elif action == "print":
    out = sys.stdout
    for i in range(int(args[0])):
        out.write(f"line {i} of rank {rank}\n")
    if args[1:] == ["partial"]:
        out.write("no newline at the end")
    out.flush()
elif action == "segv":
    ready()
    os.kill(os.getpid(), signal.SIGSEGV)
elif action == "exit":
    ready()
    sys.exit(int(args[0]))
elif action == "wait":
    ready()
    forever()
else:
    sys.exit(f"unknown action {action}")
