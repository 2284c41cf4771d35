"""An answer token by token, then its usage: python stream.py ROUTER [API_KEY]"""
import asyncio
import sys

from weir_client import AsyncWeir, Weir

target, key = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
with Weir(target, api_key=key) as weir:
    stream = weir.stream("Tell me about rivers", model="sim-small", timeout=10)
    deltas = list(stream)
    assert len(deltas) > 1, "a stream comes in pieces"
    assert stream.usage is not None and stream.usage.output_tokens > 0
    print(f"stream deltas={len(deltas)} output_tokens={stream.usage.output_tokens}")


async def main():
    async with AsyncWeir(target, api_key=key) as weir:
        stream = weir.stream("And about lakes", model="sim-small")
        deltas = [text async for text in stream]
        answer = await weir.complete("One more", model="sim-small")
        assert deltas and stream.usage is not None and answer.text
        print(f"async deltas={len(deltas)} unary={answer.text[:20]!r}")


asyncio.run(main())
