"""What the app may import: request parameters (`params`), the backend client (`client`) and the
job statuses (`job_states`). Standard library, pydantic and httpx only: no torch, no faedkv, no
other part of analysis/."""
