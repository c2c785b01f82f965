"""A TCP proxy that injects faults between object-storage clients and a real S3 endpoint.

    with FaultProxy("http://127.0.0.1:5055") as proxy:    # the moto server
        proxy.reset(every=3)          # every 3rd new connection: RST (SO_LINGER 0, then close)
        proxy.reset(every=3, after_bytes=(None, 600))   # the same, every other one 600 bytes into the response
        proxy.stall(30.0, n=2)        # the next 2 new connections: accepted, then silence for 30 s
        ... point AWS_ENDPOINT_URL at proxy.url ...
        proxy.counts                  # {"connections": .., "forwarded": .., "resets": .., "stalls": .., …}

Faults are decided per accepted connection, in order: first the ``n`` next connections, then
every ``every``-th one (deterministic, so a run that opens enough connections always gets some).
A reset may wait until ``after_bytes`` of the response went through (a response cut mid-way; one
shorter than that is not cut). A stall ends early when the client hangs up (its read timeout).
Plain sockets and threads; everything stops with :meth:`close`.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit


def _rst(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.counts = {
            "connections": 0,
            "forwarded": 0,
            "resets": 0,
            "resets_mid_response": 0,
            "stalls": 0,
            "stalls_abandoned": 0,
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fault: dict | None = None
        self._socks: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the plan

    def reset(
        self, n: int = 0, every: int = 0, after_bytes: tuple[int | None, ...] = (None,), spare: int = 0
    ) -> FaultProxy:
        """Reset the next ``n`` new connections, then every ``every``-th: at once (``None``), or once
        ``after_bytes`` of the response went through to the client; a tuple of these is cycled
        through, fault by fault (``(None, 600)``: on connect, then 600 bytes in, …). The first
        ``spare`` new connections are forwarded (``every=1, spare=30``: an outage once a job is going)."""
        return self._plan("reset", n, every, after_bytes=tuple(after_bytes), spare=spare)

    def stall(self, seconds: float, n: int = 0, every: int = 0) -> FaultProxy:
        """Accept the next ``n`` new connections (then every ``every``-th), send nothing for
        ``seconds``, then reset them; a client that hangs up first (its read timeout) ends the
        stall early and is counted in ``stalls_abandoned``."""
        return self._plan("stall", n, every, seconds=seconds)

    def clear(self) -> None:
        """Forward everything from now on (the counts are kept)."""
        with self._lock:
            self._fault = None

    def _plan(self, kind: str, n: int, every: int, **kw) -> FaultProxy:
        if n <= 0 and every <= 0:
            raise ValueError("give n (the next connections) or every (every k-th connection)")
        with self._lock:
            self._fault = {"kind": kind, "n": n, "every": every, "seen": 0, "hits": 0, "spare": 0, **kw}
        return self

    @property
    def injected(self) -> int:
        return self.counts["resets"] + self.counts["stalls"]

    def _decide(self) -> dict | None:
        """The fault for a new connection: its kind and, for a reset, after how many bytes."""
        with self._lock:
            self.counts["connections"] += 1
            f = self._fault
            if f is None:
                return None
            if f["spare"] > 0:
                f["spare"] -= 1
                return None
            if f["n"] > 0:
                f["n"] -= 1
            else:
                f["seen"] += 1
                if not (f["every"] and f["seen"] % f["every"] == 0):
                    return None
            f["hits"] += 1
            fault = {"kind": f["kind"], "seconds": f.get("seconds")}
            if f["kind"] == "reset":
                fault["after_bytes"] = f["after_bytes"][(f["hits"] - 1) % len(f["after_bytes"])]
            return fault

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    # ------------------------------------------------------------------ the sockets

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._socks.add(client)
            threading.Thread(target=self._serve, args=(client, self._decide()), daemon=True).start()

    def _serve(self, client: socket.socket, fault: dict | None) -> None:
        upstream = None
        try:
            if fault is not None and fault["kind"] == "stall":
                self._count("stalls")
                self._silence(client, fault["seconds"])
                _rst(client)
                return
            if fault is not None and fault.get("after_bytes") is None:
                self._count("resets")
                _rst(client)
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _rst(client)
                return
            upstream.settimeout(None)
            with self._lock:
                self._socks.add(upstream)
            self._count("forwarded")
            limit = None if fault is None else fault["after_bytes"]
            up = threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True)
            up.start()
            cut = self._pipe(upstream, client, limit)
            up.join()
            upstream.close()
            if cut:  # only now: a close while the other thread still reads the socket sends nothing
                self._count("resets")
                self._count("resets_mid_response")
                _rst(client)
        finally:
            client.close()
            with self._lock:
                self._socks.discard(client)
                if upstream is not None:
                    self._socks.discard(upstream)

    def _silence(self, client: socket.socket, seconds: float) -> None:
        """Read (and drop) what the client sends, answer nothing, for ``seconds`` or until it hangs up."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            client.settimeout(min(left, 0.2))
            try:
                if not client.recv(65536):
                    self._count("stalls_abandoned")
                    return
            except TimeoutError:
                continue
            except OSError:  # reset by the client
                self._count("stalls_abandoned")
                return

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> bool:
        """Copy ``src`` to ``dst`` until EOF. After ``limit`` bytes, stop both directions and return
        True: the caller then resets the client (``dst``)."""
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return False
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    dst.shutdown(socket.SHUT_RD)  # wakes the other direction's reader: it sees EOF
                    return True
                dst.sendall(data)
                sent += len(data)
        except OSError:  # the other side went away: wake the other direction too
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return False

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:  # shutdown first: it wakes a thread blocked reading the socket, a close does not
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
