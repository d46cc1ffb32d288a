# Cython looks the .pxd of launcher._native.supervisor up by the package path
# of its full name (_native/ is not the package); cythonize tracks changes to the
# one next to supervisor.pyx. This finds that one.
include "../../supervisor.pxd"
