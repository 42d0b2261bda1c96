"""Bora GPU worker: loads the pipeline once and runs video jobs from the RQ queue."""
