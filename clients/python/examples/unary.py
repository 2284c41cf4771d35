"""One whole answer: python unary.py ROUTER [API_KEY]"""
import sys

from weir_client import Weir

target, key = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
with Weir(target, api_key=key) as weir:
    answer = weir.complete("What is a weir?", model="sim-small", max_tokens=16, timeout=10)
    assert answer.text, "an answer has text"
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
    print(f"unary model={answer.model} tokens={answer.usage.total_tokens} text={answer.text!r}")
