"""JSON log lines for the worker process: the shared formatter lives in service/jobs/logs.py (torch-free, so the
webhook sender in the API image uses it too)."""

from service.jobs.logs import JsonFormatter, configure

__all__ = ["JsonFormatter", "configure"]
