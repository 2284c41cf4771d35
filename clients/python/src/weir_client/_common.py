"""What the blocking and the asyncio clients share: building requests, reading answers and errors."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Optional, Sequence, Union

import grpc
from google.rpc import error_details_pb2, status_pb2

from weir.common.v1 import common_pb2
from weir.router.v1 import router_pb2

#: A prompt: a string (one user message), or messages as ``{"role": "user", "content": "..."}``
#: mappings or ``weir.common.v1.Message`` objects.
Prompt = Union[str, Sequence[Union[Mapping[str, str], common_pb2.Message]]]

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}

_CRITICALITIES = {
    "CRITICAL_PLUS": common_pb2.CRITICALITY_CRITICAL_PLUS,
    "CRITICAL": common_pb2.CRITICALITY_CRITICAL,
    "SHEDDABLE_PLUS": common_pb2.CRITICALITY_SHEDDABLE_PLUS,
    "SHEDDABLE": common_pb2.CRITICALITY_SHEDDABLE,
}

#: Codes a call is sent again for, when the server says when (``grpc-retry-pushback-ms``).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Tokens an answer used."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: common_pb2.Usage) -> "Usage":
        return cls(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            total_tokens=usage.total_tokens,
        )


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole answer: its text, the model that wrote it, tokens and cost (micro-USD)."""

    text: str
    model: str
    usage: Usage
    cost_micros: int
    trace_id: str
    response: router_pb2.CompleteResponse

    @classmethod
    def of(cls, response: router_pb2.CompleteResponse) -> "Completion":
        return cls(
            text=response.message.content,
            model=response.model,
            usage=Usage.of(response.usage),
            cost_micros=response.cost_micros,
            trace_id=response.trace_id,
            response=response,
        )


class WeirError(Exception):
    """A call Weir refused or could not serve, with the details it sent (``google.rpc``).

    ``code`` is the gRPC status code, ``reason`` the ErrorInfo reason (``RATE_LIMITED``,
    ``BUDGET_EXHAUSTED``, ``OVERLOADED``, ...), ``retry_delay`` the RetryInfo delay in seconds
    (None when the server gave none), ``quota_violations`` and ``field_violations`` the
    QuotaFailure and BadRequest entries as ``(subject or field, description)`` pairs.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        retry_delay: Optional[float] = None,
        quota_violations: Sequence[tuple] = (),
        field_violations: Sequence[tuple] = (),
        metadata: Optional[dict] = None,
    ):
        super().__init__(f"{code.name}{f' ({reason})' if reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_delay = retry_delay
        self.quota_violations = list(quota_violations)
        self.field_violations = list(field_violations)
        self.metadata = metadata or {}

    @classmethod
    def of(cls, code: grpc.StatusCode, details: str, trailers) -> "WeirError":
        """The error of a failed call: its code, message and trailing metadata."""
        metadata = {key: value for key, value in (trailers or ())}
        reason, retry_delay, quotas, fields = "", None, [], []
        raw = metadata.get("grpc-status-details-bin")
        if raw:
            status = status_pb2.Status.FromString(raw)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    retry_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                    info = error_details_pb2.QuotaFailure()
                    detail.Unpack(info)
                    quotas = [(v.subject, v.description) for v in info.violations]
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    info = error_details_pb2.BadRequest()
                    detail.Unpack(info)
                    fields = [(v.field, v.description) for v in info.field_violations]
        return cls(code, details or "", reason, retry_delay, quotas, fields, metadata)


def pushback(error: WeirError) -> Optional[float]:
    """Seconds to wait before sending again, when the server said (``grpc-retry-pushback-ms``);
    None when it did not, or said not to retry (a negative value)."""
    if error.code not in RETRYABLE:
        return None
    value = error.metadata.get("grpc-retry-pushback-ms")
    if value is None:
        return None
    try:
        millis = int(value)
    except ValueError:
        return None
    return millis / 1000 if millis >= 0 else None


def messages(prompt: Prompt, system: Optional[str] = None) -> list:
    """The messages of a prompt (a system message first, when given)."""
    out = []
    if system:
        out.append(common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=system))
    if isinstance(prompt, str):
        out.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt))
        return out
    for message in prompt:
        if isinstance(message, common_pb2.Message):
            out.append(message)
            continue
        role = message.get("role", "user")
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {sorted(_ROLES)}")
        out.append(common_pb2.Message(role=_ROLES[role], content=message.get("content", "")))
    return out


def params(
    max_tokens: Optional[int], temperature: Optional[float], stop: Iterable[str] = ()
) -> common_pb2.GenerationParams:
    """Generation parameters; what is None is left to the model's defaults."""
    generation = common_pb2.GenerationParams(stop=list(stop))
    if max_tokens is not None:
        generation.max_tokens = max_tokens
    if temperature is not None:
        generation.temperature = temperature
    return generation


def metadata(api_key: Optional[str], criticality: Optional[str]) -> list:
    """The metadata of every call: the key and the criticality."""
    out = []
    if api_key:
        out.append(("authorization", f"Bearer {api_key}"))
    if criticality:
        if criticality not in _CRITICALITIES:
            raise ValueError(
                f"unknown criticality {criticality!r}: use one of {sorted(_CRITICALITIES)}"
            )
        out.append(("weir-criticality", criticality))
    return out


def complete_request(
    prompt: Prompt,
    model: str,
    system: Optional[str],
    session_id: str,
    max_tokens: Optional[int],
    temperature: Optional[float],
    request_id: str = "",
) -> router_pb2.CompleteRequest:
    """A ``Complete`` request."""
    return router_pb2.CompleteRequest(
        model=model,
        messages=messages(prompt, system),
        session_id=session_id,
        params=params(max_tokens, temperature),
        request_id=request_id,
    )


def stream_request(
    prompt: Prompt,
    model: str,
    system: Optional[str],
    session_id: str,
    max_tokens: Optional[int],
    temperature: Optional[float],
) -> router_pb2.CompleteStreamRequest:
    """A ``CompleteStream`` request."""
    return router_pb2.CompleteStreamRequest(
        model=model,
        messages=messages(prompt, system),
        session_id=session_id,
        params=params(max_tokens, temperature),
    )


class StreamState:
    """What a stream has said so far: the serving model and trace (from its start), and the
    final usage and cost (from its end)."""

    def __init__(self):
        self.model = ""
        self.trace_id = ""
        self.usage: Optional[Usage] = None
        self.cost_micros = 0

    def _take(self, event: router_pb2.CompleteStreamResponse) -> Optional[str]:
        """Records `event`; its text, when it is a delta."""
        kind = event.WhichOneof("event")
        if kind == "start":
            self.model = event.start.model
            self.trace_id = event.start.trace_id
        elif kind == "delta":
            return event.delta.text
        elif kind == "done":
            self.usage = Usage.of(event.done.usage)
            self.cost_micros = event.done.cost_micros
        return None
