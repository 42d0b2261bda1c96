"""Container health probe: exit 0 iff GET URL answers 2xx within the timeout.

The slim images carry no curl or wget; this stdlib script is what HEALTHCHECK runs.
Usage: python healthcheck.py http://127.0.0.1:8000/healthz
"""

import sys
import urllib.request


def main() -> int:
    url = sys.argv[1]
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if 200 <= response.status < 300 else 1
    except Exception as exc:  # any failure is "unhealthy"; the reason goes to `docker inspect`
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
