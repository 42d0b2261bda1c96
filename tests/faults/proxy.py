"""A fault-injecting TCP proxy between our processes and Redis (test tooling, loopback only).

Modes, switchable at any time from the test:
- `delay_replies(s)`: hold every reply from Redis for `s` seconds (past the client's socket timeout, the
  client gives up although Redis ran the command);
- `drop_after(pattern, n)`: forward the next `n` client writes containing `pattern` (e.g. b"EXEC"), let Redis
  run them, then cut that connection before the reply arrives - an ambiguous commit;
- `blackhole(s)`: for `s` seconds forward nothing either way and answer nothing (a partition); connections
  open meanwhile are cut when it ends.
Counts of what it did are in `stats`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._delay = 0.0
        self._blackhole_until = 0.0
        self._drop: tuple[bytes, int] = (b"", 0)
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- modes ------------------------------------------------------------------------------------------

    def delay_replies(self, seconds: float) -> None:
        self._delay = seconds
        self.stats["delay_set"] += 1

    def drop_after(self, pattern: bytes, times: int = 1) -> None:
        with self._lock:
            self._drop = (pattern, times)

    def blackhole(self, seconds: float) -> None:
        self._blackhole_until = time.monotonic() + seconds
        self.stats["blackholes"] += 1
        cut = threading.Timer(seconds, self.cut_all)  # a healed partition: the old connections are reset
        cut.daemon = True
        cut.start()

    def cut_all(self) -> None:
        for conn in list(self._conns):
            _close(conn)

    def blackholed(self) -> bool:
        return time.monotonic() < self._blackhole_until

    def heal(self) -> None:
        self._delay, self._blackhole_until = 0.0, 0.0
        with self._lock:
            self._drop = (b"", 0)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for conn in list(self._conns):
            _close(conn)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            self._conns.update((client, server))
            self.stats["connections"] += 1
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        swallowed = False
        tail = b""  # the end of the previous chunk: a pattern may straddle two reads
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.blackholed():
                    swallowed = True
                    continue  # a partition: nothing gets through
                if swallowed:
                    break  # the partition ended: this connection's streams are out of step; cut it
                if not upstream and self._delay:
                    time.sleep(self._delay)
                    self.stats["delayed_replies"] += 1
                sink.sendall(data)
                if upstream and self._should_drop(tail + data):
                    time.sleep(0.05)  # let Redis run it
                    self.stats["dropped_after_forward"] += 1
                    break
                tail = data[-64:]
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)
            self._conns.discard(source)
            self._conns.discard(sink)

    def _should_drop(self, data: bytes) -> bool:
        with self._lock:
            pattern, times = self._drop
            if times and pattern and pattern in data:
                self._drop = (pattern, times - 1)
                return True
        return False


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
