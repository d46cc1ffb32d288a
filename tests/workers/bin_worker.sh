#!/bin/bash
# A worker for the single binary's tests that needs no Python: bash builtins, and `sleep` for `children`.
#
#   bin_worker.sh DIR record          write its environment to DIR/<RANK>.env (one NAME=VALUE a line) and
#                                     which Python is on PATH to DIR/<RANK>.python ("none" when none), exit 0
#   bin_worker.sh DIR children N SIG  start N `sleep` children in its process group; at SIG, append the
#                                     signal's name to DIR/<RANK>.signals and exit 0
#   bin_worker.sh DIR slow-stop SIG   at SIG, append the signal's name to DIR/<RANK>.signals, wait for the
#                                     file DIR/release, write DIR/<RANK>.done and exit 0
#   bin_worker.sh DIR exit CODE       exit with CODE
#
# Every worker but `exit` writes its pid to DIR/<RANK>.ready once set up.
set -u
dir=$1 action=$2
case $action in
record)
    env_file="$dir/$RANK.env"
    : > "$env_file"
    while IFS= read -r -d '' entry; do printf '%s\n' "$entry" >> "$env_file"; done < /proc/self/environ
    printf '%s\n' "$(command -v python3 || command -v python || printf none)" > "$dir/$RANK.python"
    ;;
children)
    trap "printf 'SIG%s\n' $4 >> '$dir/$RANK.signals'; exit 0" "$4"
    pids=()
    for ((i = 0; i < $3; i++)); do
        sleep 1000 &
        pids+=($!)
    done
    printf '%s\n' "${pids[@]}" > "$dir/$RANK.children"
    printf '%s\n' $$ > "$dir/$RANK.ready"
    wait
    ;;
slow-stop)
    trap "printf 'SIG%s\n' $3 >> '$dir/$RANK.signals'; while [ ! -e '$dir/release' ]; do sleep 0.01; done; : > '$dir/$RANK.done'; exit 0" "$3"
    printf '%s\n' $$ > "$dir/$RANK.ready"
    sleep 1000 &
    wait
    ;;
exit)
    exit "$3"
    ;;
*)
    printf 'unknown action %s\n' "$action" >&2
    exit 2
    ;;
esac
