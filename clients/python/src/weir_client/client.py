"""The blocking client: ``Weir(target, api_key=...)``."""

from __future__ import annotations

import time
from typing import Iterator, Optional

import grpc

from weir.router.v1 import router_pb2, router_pb2_grpc
from weir.session.v1 import session_pb2, session_pb2_grpc

from ._common import (
    Completion,
    Prompt,
    StreamState,
    WeirError,
    complete_request,
    messages,
    metadata,
    pushback,
    stream_request,
)

#: How many times a call the server pushed back is sent again.
MAX_PUSHBACK_RETRIES = 3


class Stream(StreamState):
    """A streamed answer: iterate it for the text deltas as the model writes them; once it is
    exhausted, ``usage``, ``cost_micros`` and ``model`` hold the final figures."""

    def __init__(self, call):
        super().__init__()
        self._call = call

    def __iter__(self) -> Iterator[str]:
        try:
            for event in self._call:
                text = self._take(event)
                if text is not None:
                    yield text
        except grpc.RpcError as error:
            raise WeirError.of(error.code(), error.details(), error.trailing_metadata()) from None

    def cancel(self) -> None:
        """Stops the stream (and the model call upstream)."""
        self._call.cancel()


class Weir:
    """A client of Weir's router (and, for sessions, its session service).

    ``target`` is the router's ``host:port``; ``api_key`` is sent as ``authorization: Bearer``;
    ``criticality`` (``CRITICAL``, ``SHEDDABLE``, ...) is sent with every call; ``timeout`` is
    each call's deadline in seconds unless a call gives its own. Errors are raised as
    :class:`WeirError` with the ``google.rpc`` details. A call refused with
    ``grpc-retry-pushback-ms`` (overload, rate limit) is sent again after that long, up to
    :data:`MAX_PUSHBACK_RETRIES` times; without it, the error is raised at once.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: Optional[str] = None,
        *,
        session_target: Optional[str] = None,
        criticality: Optional[str] = None,
        timeout: float = 30.0,
    ):
        self._channel = grpc.insecure_channel(target)
        self._router = router_pb2_grpc.RouterServiceStub(self._channel)
        self._session_channel = grpc.insecure_channel(session_target) if session_target else None
        self._sessions = (
            session_pb2_grpc.SessionServiceStub(self._session_channel)
            if self._session_channel
            else None
        )
        self._metadata = metadata(api_key, criticality)
        self._timeout = timeout

    def __enter__(self) -> "Weir":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections."""
        self._channel.close()
        if self._session_channel:
            self._session_channel.close()

    def _call(self, method, request, timeout: Optional[float]):
        for attempt in range(MAX_PUSHBACK_RETRIES + 1):
            try:
                return method(
                    request,
                    timeout=timeout if timeout is not None else self._timeout,
                    metadata=self._metadata,
                )
            except grpc.RpcError as rpc:
                error = WeirError.of(rpc.code(), rpc.details(), rpc.trailing_metadata())
                wait = pushback(error)
                if wait is None or attempt == MAX_PUSHBACK_RETRIES:
                    raise error from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def complete(
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
        """The whole answer to ``prompt``. With ``request_id``, a retry is answered once and
        paid once."""
        request = complete_request(
            prompt, model, system, session_id, max_tokens, temperature, request_id
        )
        return Completion.of(self._call(self._router.Complete, request, timeout))

    def stream(
        self,
        prompt: Prompt,
        *,
        model: str = "auto",
        system: Optional[str] = None,
        session_id: str = "",
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        timeout: Optional[float] = None,
    ) -> Stream:
        """The answer to ``prompt`` token by token: iterate the returned :class:`Stream`."""
        request = stream_request(prompt, model, system, session_id, max_tokens, temperature)
        call = self._router.CompleteStream(
            request,
            timeout=timeout if timeout is not None else self._timeout,
            metadata=self._metadata,
        )
        return Stream(call)

    def create_session(self, user_id: str = "", *, model: str = "") -> str:
        """A new conversation on the session service (``session_target``): its id, to pass as
        ``session_id``."""
        if self._sessions is None:
            raise ValueError("sessions need session_target: the session service's host:port")
        request = session_pb2.CreateSessionRequest(user_id=user_id, model=model)
        return self._call(self._sessions.CreateSession, request, None).session.id

    def delete_session(self, session_id: str) -> None:
        """Deletes a conversation and its history."""
        if self._sessions is None:
            raise ValueError("sessions need session_target: the session service's host:port")
        request = session_pb2.DeleteSessionRequest(session_id=session_id)
        self._call(self._sessions.DeleteSession, request, None)

    def submit_job(
        self, prompt: Prompt, *, model: str = "auto", request_id: str = ""
    ) -> router_pb2.Job:
        """Queues ``prompt`` as an asynchronous job; a retry with ``request_id`` returns it."""
        request = router_pb2.SubmitJobRequest(
            request=router_pb2.CompleteRequest(model=model, messages=messages(prompt)),
            request_id=request_id,
        )
        return self._call(self._router.SubmitJob, request, None).job

    def get_job(self, job_id: str) -> router_pb2.Job:
        """A job, with its result once it has ended."""
        request = router_pb2.GetJobRequest(job_id=job_id)
        return self._call(self._router.GetJob, request, None).job

    def wait_job(self, job_id: str, *, timeout: Optional[float] = None) -> router_pb2.Job:
        """Follows a job (``WatchJob``) until it ends; the ended job."""
        request = router_pb2.WatchJobRequest(job_id=job_id)
        last = None
        try:
            for change in self._router.WatchJob(
                request,
                timeout=timeout if timeout is not None else self._timeout,
                metadata=self._metadata,
            ):
                last = change.job
        except grpc.RpcError as rpc:
            raise WeirError.of(rpc.code(), rpc.details(), rpc.trailing_metadata()) from None
        return last
