#!/bin/sh
# Runs a command that must fail: passes when it exits non-zero and a line of its stdout or its stderr
# (kept apart, so that lines of the two streams cannot interleave) matches a pattern.
#   expect_job_failure.sh PATTERN COMMAND [ARGS...]
pattern=$1
shift
dir=$(mktemp -d)
"$@" >"$dir/out" 2>"$dir/err"
status=$?
cat "$dir/out" "$dir/err"
echo "exit status $status"
matched=1
grep -Eq "$pattern" "$dir/out" "$dir/err" && matched=0
rm -rf "$dir"
[ "$status" -ne 0 ] && [ "$matched" -eq 0 ]
