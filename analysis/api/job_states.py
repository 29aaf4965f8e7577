"""The states of a backend job, the one home of the list (stdlib only: the client, and so the
app, reads them; the job queue writes them)."""

JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
# A job in one of these has stopped for good: waiting on it returns.
TERMINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
