#!/bin/bash
# Record the attempt this worker ran in, then fail.
echo "$TORCHELASTIC_RESTART_COUNT" > "$1/rank${RANK}_attempt${TORCHELASTIC_RESTART_COUNT}"
exit 7
