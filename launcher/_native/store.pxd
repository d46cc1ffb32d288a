# Where Cython looks for the declarations of launcher._native.store: on the module's package path.
# They are in _native/store.pxd, next to the code that uses them.
include "_native/store.pxd"
