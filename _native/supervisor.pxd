# The supervisor extension's declarations (uvloop's layout): each part's C
# interface and its classes' typed state, in a .pxd next to the part's .pyx.
# Cython finds this file through launcher/_native/supervisor.pxd (the package
# path of the extension's full name); cythonize tracks it under this name.
from libc.stdint cimport int32_t, uint32_t
from libcpp.deque cimport deque
from libcpp.string cimport string
from libcpp.vector cimport vector
from posix.resource cimport rlimit
from posix.signal cimport sigaction_t, siginfo_t
from posix.types cimport pid_t, sigset_t

from linux cimport cpu_set_t

include "supervisor/signals.pxd"
include "supervisor/output.pxd"
include "supervisor/cgroup.pxd"
include "supervisor/processes.pxd"
