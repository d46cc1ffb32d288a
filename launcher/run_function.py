"""Worker side of ``elastic_launch(config, function)``: run the pickled function, keep its return value.

    python -m launcher.run_function PAYLOAD

PAYLOAD holds the parent's ``sys.path`` (so the function's module imports the
same way here) and the pickled ``(function, args)``. The return value is
pickled next to the worker's error file, where the agent collects it.
"""
import os
import pickle
import sys

from launcher.errors import ERROR_FILE_ENV, record


@record
def main(payload_path: str) -> None:
    with open(payload_path, "rb") as f:
        parent_path, blob = pickle.load(f)
    sys.path[:0] = [entry for entry in parent_path if entry not in sys.path]
    function, args = pickle.loads(blob)
    value = function(*args)
    result_dir = os.path.dirname(os.environ[ERROR_FILE_ENV])
    with open(os.path.join(result_dir, "return_value.pkl"), "wb") as out:
        pickle.dump(value, out)


if __name__ == "__main__":
    main(sys.argv[1])
