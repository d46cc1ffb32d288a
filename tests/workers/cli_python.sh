#!/bin/bash
# A worker interpreter for --python: note that it ran, then be the real Python ($CLI_REAL_PYTHON).
touch "$CLI_RECORD_DIR/interpreter.$RANK"
exec "$CLI_REAL_PYTHON" "$@"
