import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from weir.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATE_UNSPECIFIED: _ClassVar[ItemState]
    ITEM_STATE_PENDING: _ClassVar[ItemState]
    ITEM_STATE_CLAIMED: _ClassVar[ItemState]
    ITEM_STATE_DECIDED: _ClassVar[ItemState]
    ITEM_STATE_CANCELLED: _ClassVar[ItemState]
    ITEM_STATE_EXPIRED: _ClassVar[ItemState]

class ReviewMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_MODE_UNSPECIFIED: _ClassVar[ReviewMode]
    REVIEW_MODE_BLOCKING: _ClassVar[ReviewMode]
    REVIEW_MODE_POST_HOC: _ClassVar[ReviewMode]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_APPROVE: _ClassVar[Verdict]
    VERDICT_REJECT: _ClassVar[Verdict]
    VERDICT_EDIT: _ClassVar[Verdict]

class AuditAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_ACTION_UNSPECIFIED: _ClassVar[AuditAction]
    AUDIT_ACTION_CREATED: _ClassVar[AuditAction]
    AUDIT_ACTION_CLAIMED: _ClassVar[AuditAction]
    AUDIT_ACTION_LEASE_RENEWED: _ClassVar[AuditAction]
    AUDIT_ACTION_LEASE_EXPIRED: _ClassVar[AuditAction]
    AUDIT_ACTION_DECIDED: _ClassVar[AuditAction]
    AUDIT_ACTION_CANCELLED: _ClassVar[AuditAction]
    AUDIT_ACTION_EXPIRED: _ClassVar[AuditAction]
    AUDIT_ACTION_ESCALATED: _ClassVar[AuditAction]
ITEM_STATE_UNSPECIFIED: ItemState
ITEM_STATE_PENDING: ItemState
ITEM_STATE_CLAIMED: ItemState
ITEM_STATE_DECIDED: ItemState
ITEM_STATE_CANCELLED: ItemState
ITEM_STATE_EXPIRED: ItemState
REVIEW_MODE_UNSPECIFIED: ReviewMode
REVIEW_MODE_BLOCKING: ReviewMode
REVIEW_MODE_POST_HOC: ReviewMode
VERDICT_UNSPECIFIED: Verdict
VERDICT_APPROVE: Verdict
VERDICT_REJECT: Verdict
VERDICT_EDIT: Verdict
AUDIT_ACTION_UNSPECIFIED: AuditAction
AUDIT_ACTION_CREATED: AuditAction
AUDIT_ACTION_CLAIMED: AuditAction
AUDIT_ACTION_LEASE_RENEWED: AuditAction
AUDIT_ACTION_LEASE_EXPIRED: AuditAction
AUDIT_ACTION_DECIDED: AuditAction
AUDIT_ACTION_CANCELLED: AuditAction
AUDIT_ACTION_EXPIRED: AuditAction
AUDIT_ACTION_ESCALATED: AuditAction

class Lease(_message.Message):
    __slots__ = ("lease_id", "reviewer", "expire_time")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reviewer: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("verdict", "edited_content", "reviewer", "comment", "decide_time")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    EDITED_CONTENT_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    edited_content: str
    reviewer: str
    comment: str
    decide_time: _timestamp_pb2.Timestamp
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., edited_content: _Optional[str] = ..., reviewer: _Optional[str] = ..., comment: _Optional[str] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReviewItem(_message.Message):
    __slots__ = ("id", "queue", "state", "mode", "conversation", "output", "model", "reasons", "priority", "labels", "create_time", "sla_deadline_time", "lease", "decision", "trace_id", "source_request_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SLA_DEADLINE_TIME_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    queue: str
    state: ItemState
    mode: ReviewMode
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    output: _common_pb2.Message
    model: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    labels: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    sla_deadline_time: _timestamp_pb2.Timestamp
    lease: Lease
    decision: Decision
    trace_id: str
    source_request_id: str
    def __init__(self, id: _Optional[str] = ..., queue: _Optional[str] = ..., state: _Optional[_Union[ItemState, str]] = ..., mode: _Optional[_Union[ReviewMode, str]] = ..., conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., output: _Optional[_Union[_common_pb2.Message, _Mapping]] = ..., model: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sla_deadline_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., trace_id: _Optional[str] = ..., source_request_id: _Optional[str] = ...) -> None: ...

class CreateItemRequest(_message.Message):
    __slots__ = ("request_id", "queue", "mode", "conversation", "output", "model", "reasons", "priority", "sla", "labels", "trace_id", "source_request_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SLA_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queue: str
    mode: ReviewMode
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    output: _common_pb2.Message
    model: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    sla: _duration_pb2.Duration
    labels: _containers.ScalarMap[str, str]
    trace_id: str
    source_request_id: str
    def __init__(self, request_id: _Optional[str] = ..., queue: _Optional[str] = ..., mode: _Optional[_Union[ReviewMode, str]] = ..., conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., output: _Optional[_Union[_common_pb2.Message, _Mapping]] = ..., model: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., sla: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., trace_id: _Optional[str] = ..., source_request_id: _Optional[str] = ...) -> None: ...

class CreateItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class GetItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("queue", "state", "page_size", "page_token")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    queue: str
    state: ItemState
    page_size: int
    page_token: str
    def __init__(self, queue: _Optional[str] = ..., state: _Optional[_Union[ItemState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ClaimNextRequest(_message.Message):
    __slots__ = ("queue", "reviewer", "lease_duration", "item_id")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    queue: str
    reviewer: str
    lease_duration: _duration_pb2.Duration
    item_id: str
    def __init__(self, queue: _Optional[str] = ..., reviewer: _Optional[str] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., item_id: _Optional[str] = ...) -> None: ...

class ClaimNextResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("item_id", "lease_id", "lease_duration")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    lease_id: str
    lease_duration: _duration_pb2.Duration
    def __init__(self, item_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class SubmitDecisionRequest(_message.Message):
    __slots__ = ("item_id", "lease_id", "verdict", "edited_content", "comment")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    EDITED_CONTENT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    lease_id: str
    verdict: Verdict
    edited_content: str
    comment: str
    def __init__(self, item_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., edited_content: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class SubmitDecisionResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...

class WatchItemRequest(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class WatchItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...

class CancelItemRequest(_message.Message):
    __slots__ = ("item_id", "reason")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    reason: str
    def __init__(self, item_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...

class GetQueueStatsRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class GetQueueStatsResponse(_message.Message):
    __slots__ = ("queue", "pending", "claimed", "sla_breached", "oldest_pending_age", "decided_last_hour", "reviewers", "decided_total", "approval_rate")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    SLA_BREACHED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_LAST_HOUR_FIELD_NUMBER: _ClassVar[int]
    REVIEWERS_FIELD_NUMBER: _ClassVar[int]
    DECIDED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    pending: int
    claimed: int
    sla_breached: int
    oldest_pending_age: _duration_pb2.Duration
    decided_last_hour: int
    reviewers: _containers.RepeatedCompositeFieldContainer[ReviewerStats]
    decided_total: int
    approval_rate: float
    def __init__(self, queue: _Optional[str] = ..., pending: _Optional[int] = ..., claimed: _Optional[int] = ..., sla_breached: _Optional[int] = ..., oldest_pending_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., decided_last_hour: _Optional[int] = ..., reviewers: _Optional[_Iterable[_Union[ReviewerStats, _Mapping]]] = ..., decided_total: _Optional[int] = ..., approval_rate: _Optional[float] = ...) -> None: ...

class ReviewerStats(_message.Message):
    __slots__ = ("reviewer", "decided", "approved")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    decided: int
    approved: int
    def __init__(self, reviewer: _Optional[str] = ..., decided: _Optional[int] = ..., approved: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("id", "item_id", "action", "actor", "time", "detail_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    item_id: str
    action: AuditAction
    actor: str
    time: _timestamp_pb2.Timestamp
    detail_json: str
    def __init__(self, id: _Optional[str] = ..., item_id: _Optional[str] = ..., action: _Optional[_Union[AuditAction, str]] = ..., actor: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detail_json: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("item_id", "page_size", "page_token")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    page_size: int
    page_token: str
    def __init__(self, item_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchQueueRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class WatchQueueResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ...) -> None: ...
