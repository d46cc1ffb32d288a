# SignalWatch's state: the signalfd of the handled signals, and what was changed to read them, to undo.

cdef extern from "<signal.h>" nogil:
    enum:
        NSIG


cdef class SignalWatch:
    cdef int fd  # -1 once closed
    cdef bint masked  # the thread's mask is changed: ``previous`` restores it
    cdef sigset_t previous
    cdef int redirected  # how many of ``signals``, in order, have the redirecting handler
    cdef sigaction_t previous_actions[NSIG]
    cdef readonly tuple signals

    cdef int _release(self) except -1
