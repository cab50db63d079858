"""Drives a tandem router with the official Anthropic Python client, unmodified.

Usage: anthropic_client.py BASE_URL MODEL API_KEY   (BASE_URL without /v1)
Checks the Messages API against the OpenAI-compatible chat answer of the
same conversation, fetched with plain HTTP. Exits non-zero on a failure.
"""

import json
import sys
import urllib.request

import anthropic

base_url, model, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
# This SDK has no sampling parameters of its own; the server still takes
# them, so greedy answers can be compared with chat's.
GREEDY = {"temperature": 0}


def chat(body):
    req = urllib.request.Request(
        base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + api_key},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


question = "What is the capital of France?"
want = chat(
    {
        "model": model,
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}],
        "max_tokens": 16,
        "temperature": 0,
    }
)
want_text = want["choices"][0]["message"]["content"]

m = client.messages.create(
    model=model,
    system="Answer briefly.",
    messages=[{"role": "user", "content": question}],
    max_tokens=16,
    extra_body=GREEDY,
)
assert m.content[0].type == "text" and m.content[0].text == want_text, (m, want_text)
assert m.stop_reason in ("end_turn", "max_tokens"), m
assert m.usage.output_tokens == want["usage"]["completion_tokens"], m.usage
# Anthropic counts the prompt's cached tokens apart from the rest.
prompt_tokens = m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
assert prompt_tokens == want["usage"]["prompt_tokens"], m.usage

# Streaming: the SDK's own accumulator gives the same message.
with client.messages.stream(
    model=model,
    system="Answer briefly.",
    messages=[{"role": "user", "content": question}],
    max_tokens=16,
    extra_body=GREEDY,
) as stream:
    pieces = "".join(stream.text_stream)
    final = stream.get_final_message()
assert pieces == want_text, (pieces, want_text)
assert final.content[0].text == want_text and final.stop_reason == m.stop_reason, final
# message_start already knew the prompt's size; the SDK keeps it.
streamed_prompt = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
assert streamed_prompt == want["usage"]["prompt_tokens"], final.usage

# A stop sequence ends the answer and is named.
s = client.messages.create(
    model=model,
    messages=[{"role": "user", "content": "Count from one to ten: one, two,"}],
    max_tokens=32,
    extra_body=GREEDY,
    stop_sequences=[","],
)
assert s.stop_reason == "stop_sequence" and s.stop_sequence == ",", s
assert "," not in s.content[0].text, s

# A forced tool call, and its result sent back.
tools = [
    {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]
ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
t = client.messages.create(
    model=model, messages=ask, tools=tools, tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=96, extra_body=GREEDY
)
use = next(b for b in t.content if b.type == "tool_use")
assert use.name == "get_weather" and isinstance(use.input["city"], str), t
assert t.stop_reason == "tool_use", t
after = client.messages.create(
    model=model,
    messages=ask
    + [
        {"role": "assistant", "content": t.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]},
    ],
    tools=tools,
    tool_choice={"type": "none"},
    max_tokens=16,
    extra_body=GREEDY,
)
assert after.content and after.content[0].text, after

# Structured output: the answer is JSON that follows the schema.
j = client.messages.create(
    model=model,
    messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
    max_tokens=64,
    output_config={
        "format": {
            "type": "json_schema",
            "schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                "required": ["city", "country"],
                "additionalProperties": False,
            },
        }
    },
    extra_body=GREEDY,
)
assert j.stop_reason == "end_turn", j
obj = json.loads(j.content[0].text)
assert set(obj) == {"city", "country"}, obj

# A prefilled answer (a final assistant message) is continued: the reply is
# what the model adds to it, as a completion of the same prompt gives it.
begun = [{"role": "user", "content": question}, {"role": "assistant", "content": "The capital of France is"}]
p = client.messages.create(model=model, messages=begun, max_tokens=8, extra_body=GREEDY)


def post(path, body):
    req = urllib.request.Request(
        base_url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + api_key},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


ids = post("/tokenize", {"model": model, "messages": begun, "continue_final_message": True})["tokens"]
same = post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 8, "temperature": 0})
assert p.content[0].text == same["choices"][0]["text"], (p, same)
assert p.usage.input_tokens + (p.usage.cache_read_input_tokens or 0) == len(ids), (p.usage, len(ids))

# Errors arrive as the client's typed exceptions.
try:
    client.messages.create(model=model, messages=[], max_tokens=4)
    raise SystemExit("an empty conversation was accepted")
except anthropic.BadRequestError as e:
    assert e.status_code == 400
try:
    client.messages.create(model="claude-no-such-model", messages=ask, max_tokens=4)
    raise SystemExit("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.status_code == 404
bad = anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0)
try:
    bad.messages.create(model=model, messages=ask, max_tokens=4)
    raise SystemExit("a wrong API key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401

print("anthropic client: all checks passed")
