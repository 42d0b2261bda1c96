"""Bora's HTTP API: validates requests, enqueues jobs on Redis/RQ, serves status and videos. Never imports torch."""
