#!/bin/sh
# Runs a command that must fail: passes when it exits non-zero and its output matches a pattern.
#   expect_job_failure.sh PATTERN COMMAND [ARGS...]
pattern=$1
shift
out=$("$@" 2>&1)
status=$?
printf '%s\nexit status %d\n' "$out" "$status"
[ "$status" -ne 0 ] && printf '%s\n' "$out" | grep -Eq "$pattern"
