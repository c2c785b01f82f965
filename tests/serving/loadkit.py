"""Load on a real endpoint for the serving tests: kept-alive clients until told to stop, and a model swap
under that load that must fail no request."""

from __future__ import annotations

import threading
import time

import requests

CLOSED = ("RemoteDisconnected", "IncompleteRead(0 bytes read")
HAPROXY_500 = "Internal Server Error"  # Serve's HAProxy error file, for its 502/503/504 (no Date header)


def proxy_gave_up(r: requests.Response) -> bool:
    """HAProxy's own answer for a request it could not get answered (its 502, sent as Serve's 500 page)."""
    return r.status_code == 500 and r.text == HAPROXY_500 and "date" not in r.headers


def load(url: str, rows: list, stop: threading.Event, results: list, threads: int = 6, path: str = "/v1/score",
          resent: list | None = None):
    """``threads`` clients on kept-alive connections, as real clients hold them, until ``stop``.

    With ``resent``, a request whose connection closed before any byte of its answer (or of its answer's
    body) is sent once more, as HTTP/1.1 lets a client do (RFC 9112 9.3.1; a scoring request has no side
    effects), and counted there: HAProxy closes a client's kept-alive connection so, without an answer or
    a log line, when the replica it forwarded the request to is killed before reading it (HAProxy 2.8
    re-sends only requests the replica had read), and a replica killed between the answer's headers and
    its body leaves the body unsent. So is HAProxy's own 502 (Serve's 500 page, :func:`proxy_gave_up`)
    for a request whose replica closed the connection while it waited for the answer and that it did not
    re-send (``SH--`` in its log, 0 retries: about one request in 2,000 in one kill of six, seen with
    syslog on 127.0.0.1:514). Anything else is a failure."""

    def worker():
        session = requests.Session()
        while not stop.is_set():
            for attempt in (0, 1):
                try:
                    r = session.post(f"{url}{path}", json={"rows": rows}, timeout=30)
                    if resent is not None and attempt == 0 and proxy_gave_up(r):
                        resent.append("HAProxy 502")
                        continue
                    ok = r.status_code == 200
                    results.append((r.status_code, r.headers.get("X-Model-Version") if ok else r.text[:300]))
                except requests.RequestException as e:
                    if resent is not None and attempt == 0 and any(c in repr(e) for c in CLOSED):
                        resent.append(repr(e))
                        continue
                    results.append((0, repr(e)))
                break

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    return pool



def swap_under_load(url: str, path: str, rows: list, swap, old: str, new: str, threads: int = 6,
                    timeout: float = 90, one_replica=True) -> list[str]:
    """``swap()`` (a new checkpoint for the model at ``path``) while ``threads`` clients score ``rows``
    there: every answer a 200, and the versions go from ``old`` to ``new``. With ``one_replica`` (a bool, or
    a callable asked after the load: the model did not autoscale, so no replica is reconfigured after
    another), once the new bundle has answered only the requests in flight at the swap, at most one per
    other client, may still come back from the old one: a request finishes on the bundle it started with.
    Returns the versions, in the order the answers came."""
    stop, results = threading.Event(), []
    pool = load(url, rows, stop, results, threads=threads, path=path)
    time.sleep(2)
    swap()
    deadline = time.time() + timeout
    while time.time() < deadline and not (results and results[-1][1] == new):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in pool:
        t.join()
    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    assert old in versions and versions[-1] == new
    if one_replica() if callable(one_replica) else one_replica:
        late = versions[versions.index(new) :].count(old)
        assert late <= threads - 1, f"{late} answers of the old bundle after the new one answered"
    return versions
