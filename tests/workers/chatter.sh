#!/bin/bash
# Two lines on stdout and one on stderr, naming this worker's rank.
echo "creating rank $RANK"
echo "apple from rank $RANK"
echo "complaint from rank $RANK" >&2
