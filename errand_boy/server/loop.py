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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Set, Tuple

if TYPE_CHECKING:
    Handler = Callable[[int], None]
log = logging.getLogger("errand_boy.server")

IN = select.EPOLLIN
OUT = select.EPOLLOUT
RDHUP = select.EPOLLRDHUP
HUP = select.EPOLLHUP
ERR = select.EPOLLERR


class Timer:
    """A pending call; :meth:`cancel` stops it."""

    __slots__ = ("callback", "cancelled", "loop", "when")

    def __init__(self, loop: Loop, when: float, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.when = when
        self.callback: Optional[Callable[[], None]] = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            # Let go of the callback (and the connection behind it) now, not
            # when the heap gets round to this entry.
            self.callback = None
            self.loop._timer_cancelled()


class Flushable:
    """Something that wants :meth:`flush` called once the current batch of
    events has been handled, so that frames queued by several events leave
    in one ``sendmsg``."""

    __slots__ = ()

    def flush(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Loop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: Dict[int, Handler] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._dirty: Set[Flushable] = set()
        self._cancelled = 0
        # Descriptors unregistered while a batch of events is handled: the
        # batch's later events for their numbers are stale, even when a new
        # descriptor (an accepted connection) took the number meanwhile.
        self._stale: Set[int] = set()
        self.now = time.monotonic()
        self._idle: List[Callable[[], None]] = []

    def register(self, fd: int, mask: int, handler: Handler) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)
            self._stale.add(fd)

    def registered(self, fd: int) -> bool:
        return fd in self._handlers

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self, time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def _timer_cancelled(self) -> None:
        # Most timers (request timeouts) are cancelled long before they are
        # due; rebuild the heap once they are the majority, as asyncio does.
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def mark_dirty(self, item: Flushable) -> None:
        self._dirty.add(item)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, the next time no event is waiting (work
        that must not delay the next connection: a log line, say)."""
        self._idle.append(callback)

    def run_idle(self) -> None:
        idle, self._idle = self._idle, []
        for callback in idle:
            try:
                callback()
            except Exception:
                log.exception("unhandled error in deferred work")

    def run_once(self, max_wait: Optional[float] = None) -> None:
        """Wait for events (or the next timer) and handle them."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
            self._cancelled -= 1
        wait = -1.0 if max_wait is None else max_wait
        if timers:
            until = max(0.0, timers[0][0] - time.monotonic())
            wait = until if wait < 0 else min(wait, until)
        self._stale.clear()
        if self._idle:
            events = self._epoll.poll(0)
            if not events:
                self.run_idle()
                events = self._epoll.poll(wait)
        else:
            events = self._epoll.poll(wait)
        self.now = time.monotonic()
        handlers = self._handlers
        stale = self._stale
        for fd, mask in events:
            if fd in stale:
                # An earlier handler of this batch unregistered it (closed it,
                # maybe reused the number). Level-triggered: a live one's
                # event comes again on the next poll.
                continue
            handler = handlers.get(fd)
            if handler is not None:
                try:
                    handler(mask)
                except Exception:
                    log.exception("unhandled error in an event handler (fd %d)", fd)
        timers = self._timers  # (may have been rebuilt by a handler)
        while timers and (timers[0][0] <= self.now or timers[0][2].cancelled):
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                self._cancelled -= 1
                continue
            callback, timer.callback = timer.callback, None
            timer.cancelled = True
            try:
                assert callback is not None
                callback()
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
