"""An error with its details: python error.py ROUTER [API_KEY]"""
import sys

import grpc

from weir_client import Weir, WeirError

target, key = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
with Weir(target, api_key=key) as weir:
    try:
        weir.complete("hello", model="gpt-9")
    except WeirError as error:
        assert error.code == grpc.StatusCode.NOT_FOUND, error
        assert error.reason, "the ErrorInfo reason is read from the details"
        print(f"error code={error.code.name} reason={error.reason} message={error.message!r}")
    else:
        raise SystemExit("an unknown model must be refused")
    try:
        weir.complete([], model="sim-small")
    except WeirError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.field_violations, "BadRequest names the field"
        print(f"error code={error.code.name} fields={error.field_violations}")
    else:
        raise SystemExit("a request without messages must be refused")
