"""A conversation the router remembers: python session.py ROUTER SESSIONS [API_KEY]"""
import sys

from weir_client import Weir

target, sessions = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else None
with Weir(target, api_key=key, session_target=sessions) as weir:
    session = weir.create_session("user-42", model="sim-small")
    first = weir.complete("My name is Ada.", model="sim-small", session_id=session)
    second = weir.complete("What is my name?", model="sim-small", session_id=session)
    # The second request carried the first exchange as context: more input tokens.
    assert second.usage.input_tokens > first.usage.input_tokens, (first.usage, second.usage)
    print(f"session {session} input_tokens {first.usage.input_tokens} -> {second.usage.input_tokens}")
    weir.delete_session(session)
