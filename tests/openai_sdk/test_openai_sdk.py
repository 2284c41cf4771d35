"""The official OpenAI Python SDK against a running Weir (its OpenAI-compatible HTTP edge).

Run by tests/tests/openai_sdk.rs, which starts the services and passes:
  WEIR_OPENAI_BASE_URL      the edge of a mesh with API keys, budgets and idempotency records
  WEIR_OPENAI_KEY           an API key of that mesh
  WEIR_LIMITED_BASE_URL     the edge of a mesh rate-limited to 1 request/s (no keys)
  WEIR_METRICS_URL          the Prometheus metrics of the process running both meshes

Each test is what an application does with the SDK: a completion, a stream with usage, the
model list, every error status as the SDK's exception, its retries honouring Retry-After, an
Idempotency-Key replay, a client that closes a stream mid-way, which must stop the model, and
a batch: an input file uploaded, a batch created from it and followed until it completes, and its
output file read back.
"""

import io
import json
import os
import re
import time
import unittest
import urllib.request
import uuid

import openai

BASE_URL = os.environ["WEIR_OPENAI_BASE_URL"]
KEY = os.environ["WEIR_OPENAI_KEY"]
LIMITED_BASE_URL = os.environ["WEIR_LIMITED_BASE_URL"]
METRICS_URL = os.environ["WEIR_METRICS_URL"]


def client(**kwargs):
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 30)
    return openai.OpenAI(base_url=BASE_URL, api_key=KEY, **kwargs)


def ask(text):
    return [{"role": "user", "content": text}]


def model_calls(model, code):
    """weir_model_calls_total{model, grpc_code} from /metrics."""
    text = urllib.request.urlopen(METRICS_URL, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("weir_model_calls_total{"):
            continue
        if f'model="{model}"' in line and f'grpc_code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class OpenAiSdk(unittest.TestCase):
    def test_completion(self):
        completion = client().chat.completions.create(
            model="auto", messages=ask("what is a weir"), max_tokens=20, temperature=0.2, seed=7
        )
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.model, "quick")
        choice = completion.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertTrue(choice.message.content)
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertGreater(completion.usage.prompt_tokens, 0)
        self.assertEqual(
            completion.usage.total_tokens,
            completion.usage.prompt_tokens + completion.usage.completion_tokens,
        )
        # Weir's own account rides along as an extra field.
        weir = completion.model_extra["weir"]
        self.assertEqual(weir["served_by"], "primary")
        self.assertGreater(weir["cost_micros"], 0)

    def test_stream_with_usage(self):
        whole = client().chat.completions.create(model="quick", messages=ask("stream this"))
        stream = client().chat.completions.create(
            model="quick",
            messages=ask("stream this"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        self.assertTrue(all(c.object == "chat.completion.chunk" for c in chunks))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, whole.choices[0].message.content)
        last = chunks[-1]
        self.assertEqual(last.choices, [])
        self.assertEqual(last.usage.total_tokens, whole.usage.total_tokens)
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        self.assertEqual(finish[-1], "stop")

    def test_model_list(self):
        ids = [model.id for model in client().models.list()]
        self.assertEqual(ids[0], "auto")
        for name in ("quick", "slow", "drip"):
            self.assertIn(name, ids)

    def test_each_error_status_is_its_sdk_exception(self):
        sdk = client()
        cases = [
            ("quick", openai.BadRequestError, 400, {"max_tokens": 100000}, {}),
            ("denied", openai.PermissionDeniedError, 403, {}, {}),
            ("no-such-model", openai.NotFoundError, 404, {}, {}),
            # ABORTED, as for an Idempotency-Key still running past the caller's deadline.
            ("conflict", openai.ConflictError, 409, {}, {}),
            ("quick", openai.UnprocessableEntityError, 422, {}, {"weir-session-id": "s-1"}),
            ("exhausted", openai.RateLimitError, 429, {}, {}),
            ("internal", openai.InternalServerError, 500, {}, {}),
            ("broken", openai.InternalServerError, 503, {}, {}),
        ]
        for model, error, status, params, headers in cases:
            with self.subTest(model=model, status=status):
                with self.assertRaises(error) as raised:
                    sdk.chat.completions.create(
                        model=model, messages=ask("x"), extra_headers=headers, **params
                    )
                self.assertEqual(raised.exception.status_code, status)
                body = raised.exception.body
                self.assertTrue(body["message"], body)
                self.assertIn("type", body)
                self.assertIn("code", body)
        with self.assertRaises(openai.AuthenticationError) as raised:
            openai.OpenAI(base_url=BASE_URL, api_key="wrong-key-0123456789", max_retries=0).models.list()
        self.assertEqual(raised.exception.status_code, 401)

    def test_retries_honour_retry_after(self):
        limited = openai.OpenAI(base_url=LIMITED_BASE_URL, api_key="unused", max_retries=3)
        limited.chat.completions.create(model="quick", messages=ask("use the burst"))
        started = time.monotonic()
        raw = limited.chat.completions.with_raw_response.create(
            model="quick", messages=ask("wait your turn")
        )
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(raw.retries_taken, 1)
        # The limiter said when to come back (about 1 s at 1 request/s); the SDK waited that long,
        # not its own 0.5 s backoff.
        self.assertGreater(elapsed, 0.7, elapsed)
        self.assertTrue(raw.parse().choices[0].message.content)

    def test_idempotency_key_replay(self):
        key = f"sdk-replay-{uuid.uuid4().hex}"
        sdk = client()
        first = sdk.chat.completions.create(
            model="quick", messages=ask("charge me once"), extra_headers={"Idempotency-Key": key}
        )
        second = sdk.chat.completions.create(
            model="quick", messages=ask("charge me once"), extra_headers={"Idempotency-Key": key}
        )
        self.assertEqual(second.id, first.id)
        self.assertEqual(second.choices[0].message.content, first.choices[0].message.content)
        self.assertEqual(second.usage, first.usage)
        reasons = [n["reason"] for n in second.model_extra["weir"].get("notices", [])]
        self.assertIn("IDEMPOTENT_REPLAY", reasons)
        # Printed for the Rust side, which counts the model calls made under this key.
        print(f"REPLAY_KEY {key}", flush=True)

    def test_client_disconnect_stops_the_model(self):
        before = model_calls("drip", "CANCELLED")
        stream = client().chat.completions.create(
            model="drip", messages=ask("a very long answer"), stream=True
        )
        received = 0
        for chunk in stream:
            received += 1
            if received == 4:
                break
        stream.close()
        deadline = time.monotonic() + 5
        while model_calls("drip", "CANCELLED") <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertGreater(model_calls("drip", "CANCELLED"), before, "the model call was cancelled")
        self.assertEqual(model_calls("drip", "OK"), 0.0, "and never ran to its end")


    def test_files_and_batches(self):
        api = client()
        questions = {f"q{n}": f"batch question {n}" for n in range(4)}
        lines = [
            json.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "quick", "messages": ask(text)},
                }
            )
            for custom_id, text in questions.items()
        ]
        uploaded = api.files.create(
            file=("questions.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
        )
        self.assertEqual(uploaded.purpose, "batch")
        self.assertEqual(uploaded.filename, "questions.jsonl")
        self.assertIn(uploaded.id, [f.id for f in api.files.list()])
        self.assertEqual(api.files.retrieve(uploaded.id).bytes, uploaded.bytes)

        batch = api.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"suite": "sdk"},
        )
        self.assertEqual(batch.input_file_id, uploaded.id)
        self.assertEqual(batch.metadata, {"suite": "sdk"})
        deadline = time.monotonic() + 60
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            self.assertLess(time.monotonic(), deadline, f"still {batch.status}")
            time.sleep(0.2)
            batch = api.batches.retrieve(batch.id)
        self.assertEqual(batch.status, "completed")
        self.assertEqual(batch.request_counts.total, 4)
        self.assertEqual(batch.request_counts.completed, 4)
        self.assertIsNone(batch.error_file_id)
        self.assertIn(batch.id, [b.id for b in api.batches.list(limit=10)])

        content = api.files.content(batch.output_file_id).text
        results = [json.loads(line) for line in content.splitlines()]
        self.assertEqual([r["custom_id"] for r in results], list(questions))
        for result in results:
            direct = api.chat.completions.create(
                model="quick", messages=ask(questions[result["custom_id"]])
            )
            body = result["response"]["body"]
            self.assertEqual(result["response"]["status_code"], 200)
            self.assertEqual(body["choices"][0]["message"]["content"], direct.choices[0].message.content)
            self.assertEqual(body["usage"]["total_tokens"], direct.usage.total_tokens)

        self.assertTrue(api.files.delete(uploaded.id).deleted)
        with self.assertRaises(openai.NotFoundError):
            api.files.retrieve(uploaded.id)
        with self.assertRaises(openai.BadRequestError):
            api.files.create(file=("x.jsonl", io.BytesIO(b"{not json")), purpose="batch")


if __name__ == "__main__":
    unittest.main(verbosity=2)
