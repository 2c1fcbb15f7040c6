"""A small epoll event loop: descriptors, timers, and deferred flushes.

Rule: a descriptor is always unregistered before it is closed. epoll
watches the open file, not the number; a copy held elsewhere (a child in
the middle of being spawned) would keep a closed number's registration
alive and hand its events to whatever reuses the number.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

Handler = Callable[[int], None]
log = logging.getLogger("errand_boy.server")

IN = select.EPOLLIN
OUT = select.EPOLLOUT
RDHUP = select.EPOLLRDHUP
HUP = select.EPOLLHUP
ERR = select.EPOLLERR


class Timer:
    """A pending call; :meth:`cancel` stops it."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Flushable:
    """Something that wants :meth:`flush` called once the current batch of
    events has been handled, so that frames queued by several events leave
    in one ``sendmsg``."""

    def flush(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Loop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: Dict[int, Handler] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._dirty: Set[Flushable] = set()
        self.now = time.monotonic()

    def register(self, fd: int, mask: int, handler: Handler) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def registered(self, fd: int) -> bool:
        return fd in self._handlers

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def mark_dirty(self, item: Flushable) -> None:
        self._dirty.add(item)

    def run_once(self, max_wait: Optional[float] = None) -> None:
        """Wait for events (or the next timer) and handle them."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        wait = -1.0 if max_wait is None else max_wait
        if timers:
            until = max(0.0, timers[0][0] - time.monotonic())
            wait = until if wait < 0 else min(wait, until)
        events = self._epoll.poll(wait)
        self.now = time.monotonic()
        handlers = self._handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:  # an earlier handler may have closed it
                try:
                    handler(mask)
                except Exception:
                    log.exception("unhandled error in an event handler (fd %d)", fd)
        while timers and (timers[0][0] <= self.now or timers[0][2].cancelled):
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                timer.cancelled = True
                try:
                    timer.callback()
                except Exception:
                    log.exception("unhandled error in a timer")
        self.flush()

    def flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, set()
            for item in dirty:
                try:
                    item.flush()
                except Exception:
                    log.exception("unhandled error while sending")

    def close(self) -> None:
        self._epoll.close()
