# One way for both extensions to turn a failed C call into a Python exception
# (cimported: the functions are inline, so each extension carries its own copy).
from libc.errno cimport errno
from libc.string cimport strerror


cdef inline str errno_text(int code):
    """``[Errno N] text``, as OSError prints itself: for messages of other exception types."""
    return f"[Errno {code}] {strerror(code).decode()}"


cdef inline object os_error(int code, str what, object filename=None):
    """OSError for errno ``code`` (its subclass, e.g. FileNotFoundError), the message ``what: text``."""
    message = strerror(code).decode()
    if what:
        message = f"{what}: {message}"
    return OSError(code, message) if filename is None else OSError(code, message, filename)


cdef inline int check(int rc, str what) except -1:
    """``rc`` when it is not negative, else raise ``os_error(errno, what)``."""
    if rc < 0:
        raise os_error(errno, what)
    return rc
