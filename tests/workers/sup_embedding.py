"""A program that embeds the launcher (launcher.api) and has a child of its own, in a session of its own.

    sup_embedding.py DIR

The child, started before the launch, exits 7 while the job runs: the one worker releases it
(the FIFO DIR/release) and waits until it has exited. Prints the child's returncode as this
program's own wait() gets it.
"""
import os
import subprocess
import sys

from launcher.api import LaunchConfig, elastic_launch

directory = sys.argv[1]
release = os.path.join(directory, "release")
os.mkfifo(release)
child = subprocess.Popen(["sh", "-c", 'cat "$0" >/dev/null; exit 7', release], start_new_session=True)
config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                      run_id="embedding", max_restarts=0)
worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sup_worker.py")
elastic_launch(config, sys.executable)(worker, directory, "release", str(child.pid))
print(child.wait())
