"""The engine loop's outputs on an asyncio event loop: a RequestStream whose items land in an asyncio.Queue.

The engine thread calls `put`; `call_soon_threadsafe` hands the item to the HTTP front's event loop, so
a handler awaits its tokens without a thread per request. `cancel()` (a client gone) aborts the batch in
the engine, which frees its KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from serving.engine.loop import RequestStream
from serving.engine.outputs import RequestOutput

_STOP = object()


class AsyncRequestStream(RequestStream):
    def __init__(self, request_ids: Sequence[str], loop: asyncio.AbstractEventLoop):
        super().__init__(request_ids)
        self._aloop = loop
        self._aqueue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:                 # the engine thread
        try:
            self._aloop.call_soon_threadsafe(self._aqueue.put_nowait, item)
        except RuntimeError:                     # the event loop has closed: nobody is listening
            pass

    def cancel(self) -> None:
        """Abort the batch in the engine and end `outputs()` (from the event loop's thread)."""
        if self.cancelled or self.finished:
            return
        super().cancel()
        self._aqueue.put_nowait(_STOP)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, RequestOutput) until every request of the batch has finished; raises what the loop
        reported (InvalidRequest for a refused prompt, EngineDead)."""
        unfinished = set(range(len(self.request_ids)))
        while unfinished and not self.cancelled:
            item = await self._aqueue.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            index, out = item
            if out.finished:
                unfinished.discard(index)
                self.finished = not unfinished
            yield index, out
