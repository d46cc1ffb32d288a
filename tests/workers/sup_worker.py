"""A worker doing one thing the supervisor tests look at.

    sup_worker.py DIR ACTION [ARGS]

record SIGS...   handle these signals: append the name to DIR/<rank>.signals, exit 0 at the first
endure SIGS...   the same, but go on waiting
children N [stubborn|exit]
                 start N `sleep` children in its process group (stubborn: they ignore SIGTERM), write
                 their pids to DIR/<rank>.children, then wait (exit: exit 0)
orphan           start a child that outlives this worker (it exits once the FIFO DIR/release is written), then exit 0
escape [wait] [restarted]
                 start `sleep 300` in a session of its own, write its pid to DIR/<rank>.escaped and this worker's
                 /proc/self/cgroup to DIR/<rank>.cgroup, then exit 0 (wait: wait forever; restarted: first exit 1
                 in the launcher's first attempt, so that the second does this)
release PID      open the FIFO DIR/release for writing and close it, wait until process PID has exited, exit 0
print N          print N numbered lines and exit 0 (the last one without a newline when DIR is "partial")
flood N FILE     print N numbered lines, write DIR/<rank>.printed, exit 0 once FILE exists
limits           write {"nofile": [soft, hard], "fds": {descriptor: what it is}} to DIR/<rank>.limits as JSON, exit 0
stderr N         write N numbered lines to stderr and exit 1
segv             kill itself with SIGSEGV
exit CODE [FILE] exit with CODE (once FILE exists)
wait             wait forever
Every worker writes DIR/<rank>.ready once set up.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time

directory, action, *args = sys.argv[1:]
rank = os.environ.get("RANK", "0")


def ready():
    """DIR/<rank>.ready holds this worker's pid: written whole, then renamed, so no reader sees it empty."""
    path = os.path.join(directory, f"{rank}.ready")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)


def wait_until(condition):
    while not condition():
        time.sleep(0.01)


def exited(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def forever():
    while True:
        signal.pause()


if action in ("record", "endure"):
    def on_signal(signum, frame):
        with open(os.path.join(directory, f"{rank}.signals"), "a") as f:
            f.write(signal.Signals(signum).name + "\n")
        if action == "record":
            os._exit(0)

    for name in args:
        signal.signal(signal.Signals[name], on_signal)
    ready()
    forever()
elif action == "children":
    stubborn = "stubborn" in args[1:]
    children = [
        subprocess.Popen(["sleep", "1000"],
                         preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN) if stubborn else None)
        for _ in range(int(args[0]))
    ]
    with open(os.path.join(directory, f"{rank}.children"), "w") as f:
        f.write(" ".join(str(child.pid) for child in children))
    ready()
    if "exit" not in args[1:]:
        forever()
elif action == "orphan":
    child = subprocess.Popen(["cat", os.path.join(directory, "release")], stdout=subprocess.DEVNULL)
    with open(os.path.join(directory, f"{rank}.orphan"), "w") as f:
        f.write(str(child.pid))
    ready()
elif action == "escape":
    if "restarted" in args and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        sys.exit(1)
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open(os.path.join(directory, f"{rank}.escaped"), "w") as f:
        f.write(str(child.pid))
    with open("/proc/self/cgroup") as cgroup, open(os.path.join(directory, f"{rank}.cgroup"), "w") as f:
        f.write(cgroup.read())
    ready()
    if "wait" in args:
        forever()
elif action == "release":
    with open(os.path.join(directory, "release"), "w"):
        pass
    wait_until(lambda: exited(int(args[0])))
elif action == "print":
    out = sys.stdout
    for i in range(int(args[0])):
        out.write(f"line {i} of rank {rank}\n")
    if args[1:] == ["partial"]:
        out.write("no newline at the end")
    out.flush()
elif action == "flood":
    out = sys.stdout
    for i in range(int(args[0])):
        out.write(f"line {i} of rank {rank}\n")
    out.flush()
    with open(os.path.join(directory, f"{rank}.printed"), "w"):
        pass
    wait_until(lambda: os.path.exists(args[1]))
elif action == "limits":
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # listdir's own, closed by now
            continue
    limits = {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "fds": fds}
    with open(os.path.join(directory, f"{rank}.limits"), "w") as f:
        json.dump(limits, f)
elif action == "stderr":
    for i in range(int(args[0])):
        print(f"error line {i}", file=sys.stderr)
    sys.exit(1)
elif action == "segv":
    ready()
    os.kill(os.getpid(), signal.SIGSEGV)
elif action == "exit":
    if args[1:]:
        wait_until(lambda: os.path.exists(args[1]))
    ready()
    sys.exit(int(args[0]))
elif action == "wait":
    ready()
    forever()
else:
    sys.exit(f"unknown action {action}")
