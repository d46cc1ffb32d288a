"""Say ready in $CLI_RECORD_DIR/ready.<RANK>, then wait to be signalled."""
import os
import signal

open(os.path.join(os.environ["CLI_RECORD_DIR"], f"ready.{os.environ['RANK']}"), "w").close()
signal.pause()
