#!/bin/bash
# Write this worker's environment to $1/$RANK.env (bash: no Python involved).
set -eu
env > "$1/$RANK.env"
echo "bash worker $RANK of $WORLD_SIZE"
