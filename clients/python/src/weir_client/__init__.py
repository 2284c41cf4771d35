"""Weir's Python client.

    from weir_client import Weir
    with Weir("127.0.0.1:50051", api_key="...") as weir:
        print(weir.complete("Hello!").text)
        for text in weir.stream("Tell me a story"):
            print(text, end="", flush=True)

``AsyncWeir`` (in ``weir_client.aio``) is the same on asyncio. The generated stubs of the whole
API are in the ``weir`` package (``weir.router.v1.router_pb2_grpc`` and so on).
"""

from ._common import Completion, Usage, WeirError
from .aio import AsyncStream, AsyncWeir
from .client import Stream, Weir

__all__ = ["AsyncStream", "AsyncWeir", "Completion", "Stream", "Usage", "Weir", "WeirError"]
__version__ = "0.1.0"
