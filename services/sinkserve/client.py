"""A small gRPC client for the gateway, sync (``SinkServeClient``) and asyncio (``AsyncSinkServeClient``).

    with SinkServeClient("127.0.0.1:50051", api_key) as client:
        sid = client.create_session(system_prompt="Be brief.").session_id
        for event in client.send_message(sid, "Hello"):
            print(event.delta.text if event.HasField("delta") else event.finished)

Torch-free, like the gateway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import grpc

from sinkserve.v1 import sinkserve_pb2 as pb
from sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def defaults_file() -> Path:
    """Where `sinkserve up` / `sinkserve tenant create` save the address and key `sinkserve chat` uses by default."""
    base = os.environ.get("SINKSERVE_CACHE_DIR") or str(Path.home() / ".cache" / "sinkserve")
    return Path(base) / "client.json"


def load_defaults() -> dict[str, str]:
    try:
        return json.loads(defaults_file().read_text())
    except (OSError, ValueError):
        return {}


def save_defaults(**values: str) -> Path:
    path = defaults_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**load_defaults(), **{k: v for k, v in values.items() if v}}
    # It may hold an API key and the local Redis password: created 0600 (never readable by others, not even
    # for a moment) and replaced whole, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(merged, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def generation_settings(**values: Any) -> pb.GenerationSettings:
    """GenerationSettings from keyword arguments, skipping the ones left as None."""
    return pb.GenerationSettings(**{k: v for k, v in values.items() if v is not None})


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class SinkServeClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, channel: grpc.Channel | None = None):
        self.address = address
        self.api_key = api_key
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = pb_grpc.SinkServeStub(self.channel)

    def __enter__(self) -> "SinkServeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def create_session(
        self,
        system_prompt: str = "",
        settings: pb.GenerationSettings | None = None,
        labels: dict[str, str] | None = None,
        timeout: float | None = 60,
    ) -> pb.Session:
        request = pb.CreateSessionRequest(system_prompt=system_prompt, default_settings=settings, labels=labels or {})
        return self.stub.CreateSession(request, metadata=_metadata(self.api_key), timeout=timeout).session

    def send_message(
        self, session_id: str, text: str, settings: pb.GenerationSettings | None = None, timeout: float | None = None,
        request_id: str = "",
    ) -> Iterator[pb.SendMessageEvent]:
        """The turn's event stream; call ``.cancel()`` on it to hang up mid-reply. With a `request_id`, a retry of the
        same message gets the recorded turn back (``finished.replayed``) instead of a second turn."""
        request = pb.SendMessageRequest(session_id=session_id, text=text, settings=settings, request_id=request_id)
        return self.stub.SendMessage(request, metadata=_metadata(self.api_key), timeout=timeout)

    def chat(self, session_id: str, text: str, request_id: str = "", **settings: Any) -> tuple[str, pb.TurnFinished]:
        """Send one message and collect the whole reply: (text, final event)."""
        parts, final = [], None
        for event in self.send_message(session_id, text, generation_settings(**settings), request_id=request_id):
            if event.HasField("delta"):
                parts.append(event.delta.text)
            else:
                final = event.finished
        assert final is not None, "stream ended without a final event"
        return "".join(parts), final

    def get_session(self, session_id: str, timeout: float | None = 30) -> pb.Session:
        return self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=_metadata(self.api_key), timeout=timeout
        )

    def list_sessions(self, page_size: int = 0, page_token: str = "", timeout: float | None = 30):
        return self.stub.ListSessions(
            pb.ListSessionsRequest(page_size=page_size, page_token=page_token),
            metadata=_metadata(self.api_key),
            timeout=timeout,
        )

    def delete_session(self, session_id: str, timeout: float | None = 30) -> None:
        self.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), metadata=_metadata(self.api_key), timeout=timeout
        )


class AsyncSinkServeClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None):
        self.address = address
        self.api_key = api_key
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.SinkServeStub(self.channel)

    async def __aenter__(self) -> "AsyncSinkServeClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def create_session(
        self, system_prompt: str = "", settings: pb.GenerationSettings | None = None, timeout: float | None = 60
    ) -> pb.Session:
        request = pb.CreateSessionRequest(system_prompt=system_prompt, default_settings=settings)
        response = await self.stub.CreateSession(request, metadata=_metadata(self.api_key), timeout=timeout)
        return response.session

    def send_message(
        self, session_id: str, text: str, settings: pb.GenerationSettings | None = None, timeout: float | None = None,
        request_id: str = "",
    ):
        """An async-iterable call; ``.cancel()`` hangs up. `request_id`: as for SinkServeClient.send_message."""
        request = pb.SendMessageRequest(session_id=session_id, text=text, settings=settings, request_id=request_id)
        return self.stub.SendMessage(request, metadata=_metadata(self.api_key), timeout=timeout)

    async def chat(self, session_id: str, text: str, request_id: str = "",
                   **settings: Any) -> tuple[str, pb.TurnFinished]:
        parts, final = [], None
        async for event in self.send_message(session_id, text, generation_settings(**settings), request_id=request_id):
            if event.HasField("delta"):
                parts.append(event.delta.text)
            else:
                final = event.finished
        assert final is not None, "stream ended without a final event"
        return "".join(parts), final

    async def get_session(self, session_id: str, timeout: float | None = 30) -> pb.Session:
        return await self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=_metadata(self.api_key), timeout=timeout
        )

    async def delete_session(self, session_id: str, timeout: float | None = 30) -> None:
        await self.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), metadata=_metadata(self.api_key), timeout=timeout
        )

    async def stream_text(self, session_id: str, text: str, **settings: Any) -> AsyncIterator[str]:
        async for event in self.send_message(session_id, text, generation_settings(**settings)):
            if event.HasField("delta"):
                yield event.delta.text
