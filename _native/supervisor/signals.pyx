# SignalWatch: the launcher's handled signals, blocked and read from a signalfd,
# and the handler that brings a signal taken by an older thread to the thread
# that reads it (a SignalWatch's signals, a Supervisor's SIGCHLD).

cdef pthread_t redirect_targets[NSIG]  # the thread that reads each redirected signal


cdef void redirect_to_reader(int sig) noexcept nogil:
    # A thread that does not block ``sig`` took it (one started before the reader
    # blocked it, in a program that embeds the launcher): hand it to the reading
    # thread, which blocks it, so it waits in the signalfd like any other.
    pthread_kill(redirect_targets[sig], sig)


cdef int redirect_to_this_thread(int sig, sigaction_t *previous) except -1:
    """Install the handler that sends ``sig``, whichever thread takes it, to the calling thread
    (which blocks it and reads it from a signalfd); ``previous`` receives the action it replaces."""
    cdef sigaction_t redirect
    redirect_targets[sig] = pthread_self()
    memset(&redirect, 0, sizeof(redirect))
    redirect.sa_handler = redirect_to_reader
    sigfillset(&redirect.sa_mask)
    redirect.sa_flags = SA_RESTART
    return check(sigaction(sig, &redirect, previous), "sigaction")


cdef class SignalWatch:
    """Blocks ``signals`` in the calling thread and reads them from a signalfd.

    Threads started afterwards inherit the mask. A thread started before that
    does not block a signal may still take it: a handler that only re-sends it
    to the watching thread is installed meanwhile. SIGCHLD is blocked too (not
    read here): a WorkerGroup reads it to reap the orphans it adopts.
    ``close()`` restores the previous handlers and mask, as a failed
    construction does. One watch at a time.
    """

    def __cinit__(self):
        self.fd = -1

    def __init__(self, signals):
        cdef sigset_t handled, blocked
        cdef int error, number
        sigemptyset(&handled)
        numbers = []
        for sig in signals:
            number = int(sig)
            if number <= 0 or number >= NSIG or number in (SIGKILL, SIGSTOP, SIGCHLD):
                raise ValueError(f"cannot handle signal {sig}")
            sigaddset(&handled, number)
            numbers.append(number)
        self.signals = tuple(numbers)
        blocked = handled
        sigaddset(&blocked, SIGCHLD)
        error = pthread_sigmask(SIG_BLOCK, &blocked, &self.previous)
        if error:
            raise os_error(error, "pthread_sigmask")
        self.masked = True
        try:
            self.fd = check(signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC), "signalfd")
            for number in self.signals:
                redirect_to_this_thread(number, &self.previous_actions[number])
                self.redirected += 1
        except BaseException:
            self._release()
            raise

    cdef int _release(self) except -1:
        """Undo what __init__ did, as far as it got: the handlers, the signalfd, then the mask.

        Every step is taken; the first that failed is raised afterwards.
        """
        cdef int number, error
        failure = None
        while self.redirected:
            self.redirected -= 1
            number = self.signals[self.redirected]
            if sigaction(number, &self.previous_actions[number], NULL) < 0 and failure is None:
                failure = os_error(errno, "sigaction")
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        if self.masked:
            self.masked = False
            error = pthread_sigmask(SIG_SETMASK, &self.previous, NULL)
            if error and failure is None:
                failure = os_error(error, "pthread_sigmask")
        if failure is not None:
            raise failure
        return 0

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("SignalWatch is closed")
        return self.fd

    def read(self):
        """The next pending handled signal's number, or None; never blocks."""
        cdef signalfd_siginfo info
        cdef ssize_t n
        if self.fd < 0:
            raise ValueError("SignalWatch is closed")
        while True:
            n = read(self.fd, &info, sizeof(info))
            if n == sizeof(info):
                return info.ssi_signo
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno == EAGAIN:
                return None
            raise os_error(errno, "read signalfd")

    def close(self):
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
