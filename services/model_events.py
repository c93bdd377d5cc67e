"""Model status changes as events, for GET /api/v1/models/events and the dashboard.

The pool publishes `loading`, `loaded`, `failed` (a load failed) and `unloaded` (evicted,
unloaded by an admin, by a keep-alive deadline or the idle timeout); ModelAdmin publishes
`uploaded` (upload, import, copy) and `deleted`. Every event gets the next id of this process
and a timestamp. A short backlog lets a client that reconnects with `Last-Event-ID` catch up.

Subscribers are bounded twice: at most `max_subscribers` at once (more are refused), and each
holds at most `queue_size` unread events; one that falls that far behind (a client that does
not read) is dropped rather than buffered for ever. Publishing never waits for a subscriber.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from services.errors import ShuttingDown, TooBusy

KINDS = ("loading", "loaded", "unloaded", "failed", "uploaded", "deleted")
# Each open stream holds one of the server's threads for as long as it is open, so the cap is
# small and gunicorn.conf.py adds it to its thread count: followers never take the threads
# that generations and /health need.
MAX_EVENT_STREAMS = 8


@dataclass(frozen=True)
class ModelEvent:
    id: int
    kind: str
    model: str
    at: float                           # time.time()
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        stamp = datetime.fromtimestamp(self.at, timezone.utc).isoformat(timespec="milliseconds")
        return {"id": self.id, "kind": self.kind, "model": self.model,
                "at": stamp.replace("+00:00", "Z"), **self.detail}


class Subscription:
    """One reader's queue of events. `next` waits for the next one; None once the stream
    should end (the hub closed, or this reader fell `queue_size` events behind)."""

    def __init__(self, hub: "ModelEvents", backlog: list[ModelEvent]):
        self._hub = hub
        self._queue: deque[ModelEvent] = deque(backlog)
        self.ended = False
        self.dropped = False

    def next(self, timeout: float) -> ModelEvent | None | bool:
        """The next event; False when none came within `timeout` s; None when the stream ends."""
        with self._hub._changed:
            if not self._hub._changed.wait_for(lambda: self._queue or self.ended, timeout):
                return False
            if self.ended:
                return None
            return self._queue.popleft()

    def close(self) -> None:
        """Free this reader's place (idempotent)."""
        self._hub._leave(self)


class ModelEvents:
    """The hub: publish(kind, model, **detail); subscribe(last_id) for a stream of them."""

    def __init__(self, backlog: int = 100, max_subscribers: int = MAX_EVENT_STREAMS,
                 queue_size: int = 256,
                 heartbeat_seconds: float = 15.0):
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        # How often a stream sends a comment when there is nothing to say, so proxies and
        # clients see the connection alive.
        self.heartbeat_seconds = heartbeat_seconds
        self._changed = threading.Condition()
        self._ids = itertools.count(1)
        self._backlog: deque[ModelEvent] = deque(maxlen=backlog)
        self._subscribers: set[Subscription] = set()    # receiving events
        self._open: set[Subscription] = set()           # not yet closed by their reader
        self._closed = False

    def publish(self, kind: str, model: str, **detail) -> ModelEvent:
        """Record an event and hand it to every subscriber; a subscriber whose queue is full is
        dropped (its stream ends). Never blocks on a reader."""
        with self._changed:
            event = ModelEvent(next(self._ids), kind, model, time.time(),
                               {k: v for k, v in detail.items() if v is not None})
            self._backlog.append(event)
            for subscriber in list(self._subscribers):
                if len(subscriber._queue) >= self.queue_size:
                    subscriber.ended = subscriber.dropped = True
                    self._subscribers.discard(subscriber)
                else:
                    subscriber._queue.append(event)
            self._changed.notify_all()
        return event

    def subscribe(self, last_id: int | None = None) -> Subscription:
        """A new reader; with `last_id`, it first gets the backlog's events after that id (all
        of the backlog when `last_id` is ahead of this process's ids: a restarted server).

        :raise TooBusy: `max_subscribers` readers already (HTTP 429).
        :raise ShuttingDown: the hub is closed.
        """
        with self._changed:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._subscribers) >= self.max_subscribers:
                raise TooBusy(f"at most {self.max_subscribers} clients may follow the model "
                              f"events at once; retry later", retry_after=5)
            newest = self._backlog[-1].id if self._backlog else 0
            backlog = [] if last_id is None else [
                event for event in self._backlog if last_id > newest or event.id > last_id]
            subscriber = Subscription(self, backlog)
            self._subscribers.add(subscriber)
            self._open.add(subscriber)
            return subscriber

    def recent(self) -> list[ModelEvent]:
        """The backlog, oldest first."""
        with self._changed:
            return list(self._backlog)

    def subscribers(self) -> int:
        with self._changed:
            return len(self._subscribers)

    def close(self, wait: float = 0.0) -> None:
        """End every stream (shutdown) and wait up to `wait` s for their readers to close
        them (a reply's last act, its access-log line, then happens before the logs close);
        later subscribers are refused."""
        with self._changed:
            self._closed = True
            for subscriber in self._subscribers:
                subscriber.ended = True
            self._subscribers.clear()
            self._changed.notify_all()
            self._changed.wait_for(lambda: not self._open, wait)

    def _leave(self, subscriber: Subscription) -> None:
        with self._changed:
            subscriber.ended = True
            self._subscribers.discard(subscriber)
            self._open.discard(subscriber)
            self._changed.notify_all()
