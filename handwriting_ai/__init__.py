"""Compatibility package: the import path an existing bot's jobs name (`handwriting_ai.jobs.digits`)."""
