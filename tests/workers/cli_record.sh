#!/bin/bash
# Record this worker's arguments, one a line, in $CLI_RECORD_DIR/<RANK>.args (no Python involved).
printf '%s\n' "$@" > "$CLI_RECORD_DIR/$RANK.args"
