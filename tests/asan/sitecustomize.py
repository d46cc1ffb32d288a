"""`make asan`: every Python process of the run loads launcher's extensions from LAUNCHER_NATIVE_BUILD.

`make asan` puts this directory on PYTHONPATH, so Python imports this module at startup in the test
process and in every process the tests start (harnesses, launchers, workers), and sets
LAUNCHER_NATIVE_BUILD to the directory that holds the AddressSanitizer build of
``launcher._native.*``. The normal build in launcher/_native/ stays as it is. A module missing there
fails to import rather than falling back to the normal build, which would go unchecked.
"""
import importlib.machinery
import importlib.util
import os
import sys

PACKAGE = "launcher._native."


class NativeBuild:
    """A meta path finder for launcher._native.<name>: the extension module in directory."""

    def __init__(self, directory):
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        if not name.startswith(PACKAGE):
            return None
        module = name[len(PACKAGE):]
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = os.path.join(self.directory, module + suffix)
            if os.path.exists(candidate):
                return importlib.util.spec_from_file_location(name, candidate)
        raise ImportError(f"{name}: no {module}{importlib.machinery.EXTENSION_SUFFIXES[0]} in {self.directory}",
                          name=name)


if os.environ.get("LAUNCHER_NATIVE_BUILD"):
    sys.meta_path.insert(0, NativeBuild(os.path.abspath(os.environ["LAUNCHER_NATIVE_BUILD"])))
