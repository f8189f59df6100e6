"""A deadline for a whole HTTP download, however slowly the server sends.

requests' timeout bounds each socket read; a server trickling a byte at a time never trips it.
A ``Watchdog`` (one per download, found through a thread-local) shuts the sockets of the
sessions ``watched_session`` makes down when its deadline passes.
"""
from __future__ import annotations

import socket
import threading

import requests
import urllib3


class Watchdog:
    """Shuts the connection's socket down at the deadline: a server trickling its headers or
    body a byte at a time never trips the per-read timeout, so only this ends the call."""

    local = threading.local()  # the watchdog of the download running in this thread

    def __init__(self, seconds: float):
        self.fired, self.socks = False, []
        self.timer = threading.Timer(max(seconds, 0.0), self._fire)
        self.timer.daemon = True

    def _fire(self):
        self.fired = True
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        Watchdog.local.current = self
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        Watchdog.local.current = None


def _watched(connection_cls):
    class Watched(connection_cls):
        def connect(self):
            super().connect()
            dog = getattr(Watchdog.local, "current", None)
            if dog is not None:
                dog.socks.append(self.sock)
                if dog.fired:
                    dog._fire()
    return Watched


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """Connections whose sockets the running download's watchdog can shut down."""

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = _watched(urllib3.connection.HTTPConnection)

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = _watched(urllib3.connection.HTTPSConnection)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": self.HTTPPool, "https": self.HTTPSPool}


def watched_session() -> requests.Session:
    """A session whose connections the running download's ``Watchdog`` can shut down."""
    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, _WatchedAdapter())
    return session
