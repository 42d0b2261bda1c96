"""Container health probe: exit 0 iff GET URL answers 2xx within the timeout.

The slim images carry no curl or wget; this stdlib script is what HEALTHCHECK and the Kubernetes exec
probes run.
Usage: python healthcheck.py [--no-worker-ok] http://127.0.0.1:8000/healthz

--no-worker-ok (the API's Kubernetes readiness on /readyz): also healthy when /readyz answers 503 only
because no worker is ready, i.e. its body says Redis is "ok". The API still takes jobs then, and with
workers scaled to zero a submitted job is what starts one.
"""

import json
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    no_worker_ok = "--no-worker-ok" in argv
    (url,) = [arg for arg in argv if arg != "--no-worker-ok"]
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if 200 <= response.status < 300 else 1
    except urllib.error.HTTPError as exc:
        if no_worker_ok and exc.code == 503 and _redis_ok(exc):
            return 0
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    except Exception as exc:  # any failure is "unhealthy"; the reason goes to `docker inspect`
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1


def _redis_ok(response: urllib.error.HTTPError) -> bool:
    try:
        return json.loads(response.read()).get("redis") == "ok"
    except (ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
