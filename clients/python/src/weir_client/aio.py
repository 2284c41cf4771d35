"""The asyncio client: ``AsyncWeir(target, api_key=...)``, on ``grpc.aio``; the same calls as
:class:`weir_client.Weir`, awaited (and ``stream`` iterated with ``async for``)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

import grpc

from weir.router.v1 import router_pb2_grpc

from ._common import (
    Completion,
    Prompt,
    StreamState,
    WeirError,
    complete_request,
    metadata,
    pushback,
    stream_request,
)
from .client import MAX_PUSHBACK_RETRIES


class AsyncStream(StreamState):
    """A streamed answer: ``async for text in stream``; then ``usage`` and ``cost_micros``."""

    def __init__(self, call):
        super().__init__()
        self._call = call

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for event in self._call:
                text = self._take(event)
                if text is not None:
                    yield text
        except grpc.aio.AioRpcError as error:
            raise WeirError.of(error.code(), error.details(), error.trailing_metadata()) from None


class AsyncWeir:
    """The asyncio client of Weir's router (see :class:`weir_client.Weir` for the arguments)."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: Optional[str] = None,
        *,
        criticality: Optional[str] = None,
        timeout: float = 30.0,
    ):
        self._channel = grpc.aio.insecure_channel(target)
        self._router = router_pb2_grpc.RouterServiceStub(self._channel)
        self._metadata = metadata(api_key, criticality)
        self._timeout = timeout

    async def __aenter__(self) -> "AsyncWeir":
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection."""
        await self._channel.close()

    async def complete(
        self,
        prompt: Prompt,
        *,
        model: str = "auto",
        system: Optional[str] = None,
        session_id: str = "",
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        request_id: str = "",
        timeout: Optional[float] = None,
    ) -> Completion:
        """The whole answer to ``prompt``."""
        request = complete_request(
            prompt, model, system, session_id, max_tokens, temperature, request_id
        )
        for attempt in range(MAX_PUSHBACK_RETRIES + 1):
            try:
                response = await self._router.Complete(
                    request,
                    timeout=timeout if timeout is not None else self._timeout,
                    metadata=self._metadata,
                )
                return Completion.of(response)
            except grpc.aio.AioRpcError as rpc:
                error = WeirError.of(rpc.code(), rpc.details(), rpc.trailing_metadata())
                wait = pushback(error)
                if wait is None or attempt == MAX_PUSHBACK_RETRIES:
                    raise error from None
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def stream(
        self,
        prompt: Prompt,
        *,
        model: str = "auto",
        system: Optional[str] = None,
        session_id: str = "",
        max_tokens: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> AsyncStream:
        """The answer token by token: ``async for text in client.stream(...)``."""
        request = stream_request(prompt, model, system, session_id, max_tokens, None)
        call = self._router.CompleteStream(
            request,
            timeout=timeout if timeout is not None else self._timeout,
            metadata=self._metadata,
        )
        return AsyncStream(call)
