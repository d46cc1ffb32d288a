# Cython looks the .pxd of launcher._native.store up by the package path
# of its full name (_native/ is not the package); cythonize tracks changes to the
# one next to store.pyx. This finds that one.
include "../../store.pxd"
