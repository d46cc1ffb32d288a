#!/bin/bash
# A worker for the --hosts tests, in bash (as on a host without Python). Every host is this machine, so
# DIR is shared; the host a worker runs on is sshd's address in SSH_CONNECTION, which it inherits.
#
#   hosts_worker.sh DIR record ARGS...     write DIR/<RANK>.argv (ARGS, each ended by a NUL), DIR/<RANK>.environ
#                                          (its environment as the kernel holds it: NUL-separated), DIR/<RANK>.cwd,
#                                          DIR/<RANK>.stdin (what its stdin is) and DIR/<RANK>.launcher (the
#                                          program its parent, the launcher, was started as: its argv[0]), then print a line on stdout
#                                          and one on stderr
#   hosts_worker.sh DIR wait               start a `sleep` child in its process group, write "PID SLEEP_PID"
#                                          to DIR/<RANK>.ready; at SIGTERM append SIGTERM to DIR/<RANK>.signals
#                                          and exit 0
#   hosts_worker.sh DIR fail HOST N        on HOST: once DIR holds N .ready files, print a complaint on stderr
#                                          and exit 3; elsewhere: as `wait`
set -u
dir=$1 action=$2
shift 2
host=${SSH_CONNECTION:-}
host=${host#* * }   # sshd's "client port server port": keep "server port"
host=${host%% *}
case $action in
record)
    printf '%s\0' "$@" > "$dir/$RANK.argv"
    cat "/proc/$$/environ" > "$dir/$RANK.environ"
    printf '%s' "$PWD" > "$dir/$RANK.cwd"
    readlink "/proc/$$/fd/0" > "$dir/$RANK.stdin"
    # Not /proc/$PPID/exe: the single binary's launcher runs from the copy its bootloader unpacked.
    IFS= read -r -d '' launcher < "/proc/$PPID/cmdline"
    printf '%s\n' "$launcher" > "$dir/$RANK.launcher"
    echo "rank $RANK says hello"
    echo "rank $RANK complains" >&2
    ;;
wait|fail)
    if [ "$action" = fail ] && [ "$host" = "$1" ]; then
        until [ "$(find "$dir" -name '*.ready' | wc -l)" -ge "$2" ]; do sleep 0.05; done
        echo "rank $RANK on $host fails on purpose" >&2
        exit 3
    fi
    trap "printf 'SIGTERM\n' >> '$dir/$RANK.signals'; exit 0" TERM
    sleep 1000 &
    printf '%s %s\n' $$ $! > "$dir/$RANK.ready.part" && mv "$dir/$RANK.ready.part" "$dir/$RANK.ready"
    wait
    ;;
*)
    printf 'unknown action %s\n' "$action" >&2
    exit 2
    ;;
esac
