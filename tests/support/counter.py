"""A counting process in a guest, for suites that check a guest runs on (or was captured mid-way).

It counts in /tmp/count, renaming each value into place: a reader (or a capture) never finds the
file empty between a truncate and a write. Its pid is in /root/counter.pid.
"""

COUNTER = ("nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
           "mv /tmp/count.new /tmp/count; sleep 0.5; done' >/dev/null 2>&1 & "
           "echo $! > /root/counter.pid")
