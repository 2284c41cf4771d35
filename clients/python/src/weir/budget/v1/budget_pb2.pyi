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

class ScopeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_KIND_UNSPECIFIED: _ClassVar[ScopeKind]
    SCOPE_KIND_TENANT: _ClassVar[ScopeKind]
    SCOPE_KIND_API_KEY: _ClassVar[ScopeKind]
    SCOPE_KIND_USER: _ClassVar[ScopeKind]
    SCOPE_KIND_SESSION: _ClassVar[ScopeKind]

class PriceTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRICE_TIER_UNSPECIFIED: _ClassVar[PriceTier]
    PRICE_TIER_STANDARD: _ClassVar[PriceTier]
    PRICE_TIER_BATCH: _ClassVar[PriceTier]

class ReservationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVATION_STATE_UNSPECIFIED: _ClassVar[ReservationState]
    RESERVATION_STATE_HELD: _ClassVar[ReservationState]
    RESERVATION_STATE_COMMITTED: _ClassVar[ReservationState]
    RESERVATION_STATE_RELEASED: _ClassVar[ReservationState]
    RESERVATION_STATE_EXPIRED: _ClassVar[ReservationState]

class PeriodUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERIOD_UNIT_UNSPECIFIED: _ClassVar[PeriodUnit]
    PERIOD_UNIT_DAILY: _ClassVar[PeriodUnit]
    PERIOD_UNIT_WEEKLY: _ClassVar[PeriodUnit]
    PERIOD_UNIT_MONTHLY: _ClassVar[PeriodUnit]
SCOPE_KIND_UNSPECIFIED: ScopeKind
SCOPE_KIND_TENANT: ScopeKind
SCOPE_KIND_API_KEY: ScopeKind
SCOPE_KIND_USER: ScopeKind
SCOPE_KIND_SESSION: ScopeKind
PRICE_TIER_UNSPECIFIED: PriceTier
PRICE_TIER_STANDARD: PriceTier
PRICE_TIER_BATCH: PriceTier
RESERVATION_STATE_UNSPECIFIED: ReservationState
RESERVATION_STATE_HELD: ReservationState
RESERVATION_STATE_COMMITTED: ReservationState
RESERVATION_STATE_RELEASED: ReservationState
RESERVATION_STATE_EXPIRED: ReservationState
PERIOD_UNIT_UNSPECIFIED: PeriodUnit
PERIOD_UNIT_DAILY: PeriodUnit
PERIOD_UNIT_WEEKLY: PeriodUnit
PERIOD_UNIT_MONTHLY: PeriodUnit

class Scope(_message.Message):
    __slots__ = ("kind", "id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    kind: ScopeKind
    id: str
    def __init__(self, kind: _Optional[_Union[ScopeKind, str]] = ..., id: _Optional[str] = ...) -> None: ...

class ModelPrice(_message.Message):
    __slots__ = ("model", "version", "input_micros_per_mtok", "output_micros_per_mtok", "cached_input_micros_per_mtok", "batch_input_micros_per_mtok", "batch_output_micros_per_mtok", "free")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    BATCH_INPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    BATCH_OUTPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    cached_input_micros_per_mtok: int
    batch_input_micros_per_mtok: int
    batch_output_micros_per_mtok: int
    free: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., input_micros_per_mtok: _Optional[int] = ..., output_micros_per_mtok: _Optional[int] = ..., cached_input_micros_per_mtok: _Optional[int] = ..., batch_input_micros_per_mtok: _Optional[int] = ..., batch_output_micros_per_mtok: _Optional[int] = ..., free: bool = ...) -> None: ...

class EstimateCostRequest(_message.Message):
    __slots__ = ("model", "input_tokens", "cached_input_tokens", "max_output_tokens", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_tokens: int
    cached_input_tokens: int
    max_output_tokens: int
    tier: PriceTier
    def __init__(self, model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., tier: _Optional[_Union[PriceTier, str]] = ...) -> None: ...

class EstimateCostResponse(_message.Message):
    __slots__ = ("cost_micros", "price")
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    cost_micros: int
    price: ModelPrice
    def __init__(self, cost_micros: _Optional[int] = ..., price: _Optional[_Union[ModelPrice, _Mapping]] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("id", "state", "scopes", "amount_micros", "committed_micros", "model", "create_time", "expire_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MICROS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_MICROS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: ReservationState
    scopes: _containers.RepeatedCompositeFieldContainer[Scope]
    amount_micros: int
    committed_micros: int
    model: str
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[ReservationState, str]] = ..., scopes: _Optional[_Iterable[_Union[Scope, _Mapping]]] = ..., amount_micros: _Optional[int] = ..., committed_micros: _Optional[int] = ..., model: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "scopes", "amount_micros", "ttl", "model", "price_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MICROS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    scopes: _containers.RepeatedCompositeFieldContainer[Scope]
    amount_micros: int
    ttl: _duration_pb2.Duration
    model: str
    price_version: str
    def __init__(self, request_id: _Optional[str] = ..., scopes: _Optional[_Iterable[_Union[Scope, _Mapping]]] = ..., amount_micros: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., model: _Optional[str] = ..., price_version: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "request_id", "usage", "tier", "cost_micros")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    request_id: str
    usage: _common_pb2.Usage
    tier: PriceTier
    cost_micros: int
    def __init__(self, reservation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., tier: _Optional[_Union[PriceTier, str]] = ..., cost_micros: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("reservation", "cost_micros", "refunded_micros", "overrun_micros")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_MICROS_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_MICROS_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    cost_micros: int
    refunded_micros: int
    overrun_micros: int
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ..., cost_micros: _Optional[int] = ..., refunded_micros: _Optional[int] = ..., overrun_micros: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ...) -> None: ...

class CalendarPeriod(_message.Message):
    __slots__ = ("unit", "time_zone")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    unit: PeriodUnit
    time_zone: str
    def __init__(self, unit: _Optional[_Union[PeriodUnit, str]] = ..., time_zone: _Optional[str] = ...) -> None: ...

class Period(_message.Message):
    __slots__ = ("calendar", "rolling")
    CALENDAR_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    calendar: CalendarPeriod
    rolling: _duration_pb2.Duration
    def __init__(self, calendar: _Optional[_Union[CalendarPeriod, _Mapping]] = ..., rolling: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("scope", "hard_limit_micros", "soft_limit_fraction", "period", "spent_micros", "held_micros", "period_start_time", "period_end_time", "soft_limit_reached")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    HELD_MICROS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_REACHED_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    hard_limit_micros: int
    soft_limit_fraction: float
    period: Period
    spent_micros: int
    held_micros: int
    period_start_time: _timestamp_pb2.Timestamp
    period_end_time: _timestamp_pb2.Timestamp
    soft_limit_reached: bool
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ..., hard_limit_micros: _Optional[int] = ..., soft_limit_fraction: _Optional[float] = ..., period: _Optional[_Union[Period, _Mapping]] = ..., spent_micros: _Optional[int] = ..., held_micros: _Optional[int] = ..., period_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., soft_limit_reached: bool = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("scope", "hard_limit_micros", "soft_limit_fraction", "period")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    hard_limit_micros: int
    soft_limit_fraction: float
    period: Period
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ..., hard_limit_micros: _Optional[int] = ..., soft_limit_fraction: _Optional[float] = ..., period: _Optional[_Union[Period, _Mapping]] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class GetSpendRequest(_message.Message):
    __slots__ = ("scope", "start_time", "end_time")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelSpend(_message.Message):
    __slots__ = ("model", "cost_micros", "requests", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    cost_micros: int
    requests: int
    usage: _common_pb2.Usage
    def __init__(self, model: _Optional[str] = ..., cost_micros: _Optional[int] = ..., requests: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class GetSpendResponse(_message.Message):
    __slots__ = ("total_micros", "by_model")
    TOTAL_MICROS_FIELD_NUMBER: _ClassVar[int]
    BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    total_micros: int
    by_model: _containers.RepeatedCompositeFieldContainer[ModelSpend]
    def __init__(self, total_micros: _Optional[int] = ..., by_model: _Optional[_Iterable[_Union[ModelSpend, _Mapping]]] = ...) -> None: ...

class ListPricesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPricesResponse(_message.Message):
    __slots__ = ("prices", "next_page_token")
    PRICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prices: _containers.RepeatedCompositeFieldContainer[ModelPrice]
    next_page_token: str
    def __init__(self, prices: _Optional[_Iterable[_Union[ModelPrice, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
