"""The backend: the REST server (`server`, `python -m analysis.service.server`) and its job queue
(`jobs`), both looping over `analysis.tasks.kinds()`."""
