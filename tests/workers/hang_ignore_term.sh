#!/bin/bash
# Rank 1 ignores SIGTERM (so does its sleep) and waits; rank 0 exits 3 once rank 1 is ready: hang_ignore_term.sh DIR
set -eu
if [ "$RANK" = 1 ]; then
    trap '' TERM
    touch "$1/1.ready"
    sleep 1000
fi
while [ ! -e "$1/1.ready" ]; do sleep 0.01; done
exit 3
