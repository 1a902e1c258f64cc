"""An HL7 v2 receiver on 127.0.0.1, built on python-hl7's own MLLP server (hl7.mllp).

It answers each message with the ACK code a test sets (``AA``, ``AE``, ``AR``) or not at all
(``None``: silent), counts what it accepted by message control ID (MSH-10), and can be taken
down and brought back on the same port (an outage).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import hl7
import hl7.mllp

from dicom_node.testing import free_port


class MllpReceiver:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.ack_code: str | None = "AA"
        self.accepted: list[hl7.Message] = []
        self.control_ids: Counter[str] = Counter()
        self.received = 0  # every message, whatever it was answered
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    async def _client(
        self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter
    ) -> None:
        try:
            while True:
                message = await reader.readmessage()
                with self.lock:
                    self.received += 1
                    code = self.ack_code
                    if code == "AA":
                        self.accepted.append(message)
                        self.control_ids[str(message.segment("MSH")(10))] += 1
                if code is None:
                    continue  # silent: the sender's ACK timeout decides
                writer.writemessage(message.create_ack(code))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> MllpReceiver:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await hl7.mllp.start_hl7_server(
                    self._client, "127.0.0.1", self.port, encoding="utf-8"
                )
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the MLLP receiver did not start"
        return self

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        loop, server = self._loop, self._server

        async def close() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = self._server = None
