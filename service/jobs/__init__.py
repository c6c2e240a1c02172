"""Background learning: the job queue (``queue``), what each job does (``tasks``), the
refit triggers (``triggers``) and the worker process (``worker``)."""
