"""Drives a tandem router with the official OpenAI Python client, unmodified.

Usage: openai_client.py BASE_URL MODEL API_KEY
Exits non-zero (with the failing check) if anything is off.
"""

import json
import sys

import openai

base_url, model, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)

models = [m.id for m in client.models.list()]
assert model in models, models

question = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
text = r.choices[0].message.content
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, r.usage

# Streaming gives the same text, and the usage chunk when asked.
stream = client.chat.completions.create(
    model=model,
    messages=question,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert "".join(pieces) == text, ("".join(pieces), text)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# Completions, n > 1 with a seed, logprobs, stop strings.
c = client.completions.create(
    model=model, prompt="The quick brown fox", max_tokens=8, n=2, temperature=0.8, seed=7, logprobs=2
)
assert len(c.choices) == 2, c
assert c.choices[0].logprobs is not None and len(c.choices[0].logprobs.tokens) > 0, c
again = client.completions.create(
    model=model, prompt="The quick brown fox", max_tokens=8, n=2, temperature=0.8, seed=7, logprobs=2
)
assert [x.text for x in again.choices] == [x.text for x in c.choices], "seeded sampling is not reproducible"

# A batch of prompts: choice i answers prompt i // n, as each prompt alone would.
prompts = ["The quick brown fox", "Once upon a time"]
b = client.completions.create(model=model, prompt=prompts, max_tokens=6, n=2, temperature=0)
assert [x.index for x in b.choices] == [0, 1, 2, 3], b
for i, x in enumerate(b.choices):
    alone = client.completions.create(model=model, prompt=prompts[i // 2], max_tokens=6, temperature=0)
    assert x.text == alone.choices[0].text, (i, x.text, alone.choices[0].text)

# Scoring text as lm-evaluation-harness does: the prompt echoed with its
# log-probabilities (the first token unscored), `max_tokens=0` for the
# prompt alone.
def last_token_logprob(text):
    r = client.completions.create(model=model, prompt=text, echo=True, logprobs=1, max_tokens=0, temperature=0)
    ch = r.choices[0]
    assert ch.text == text and ch.finish_reason == "length" and r.usage.completion_tokens == 0, r
    lps = ch.logprobs.token_logprobs
    assert len(lps) == r.usage.prompt_tokens and lps[0] is None, ch.logprobs
    # The likeliest token, and the prompt's own when that is not it.
    tops = ch.logprobs.top_logprobs[1:]
    assert all(x <= 0 for x in lps[1:]) and all(1 <= len(t) <= 2 for t in tops), ch.logprobs
    assert all(tok in t for tok, t in zip(ch.logprobs.tokens[1:], tops)), ch.logprobs
    return lps[-1]


assert last_token_logprob("The capital of France is Paris") > last_token_logprob("The capital of France is London")

# logit_bias: a token biased by +100 is the only one produced.
def hello(**kw):
    return client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, logprobs=0, **kw)
plain = hello().choices[0].logprobs.tokens
forced = hello(logit_bias={"42": 100}).choices[0].logprobs.tokens
assert len(forced) == 3 and len(set(forced)) == 1 and forced != plain, (forced, plain)

# JSON mode: a whole JSON object comes back.
j = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": 'Return a JSON object with the key "city" set to the capital of France.'}],
    max_tokens=64,
    temperature=0,
    response_format={"type": "json_object"},
)
assert j.choices[0].finish_reason == "stop", j
assert isinstance(json.loads(j.choices[0].message.content), dict), j

# Structured output through the SDK's own helper: a Pydantic model becomes
# a strict JSON schema, and the answer parses back into it.
from pydantic import BaseModel


class Cat(BaseModel):
    name: str
    age: int
    indoor: bool


parsed = client.beta.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Describe a cat named Tom, 3 years old, who lives indoors."}],
    response_format=Cat,
    max_tokens=80,
    temperature=0,
)
cat = parsed.choices[0].message.parsed
assert isinstance(cat, Cat), parsed

# Tool calls: a named function and "required" come back as calls whose
# arguments parse and follow the function's schema; the tool's answer goes
# back in the conversation.
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
named = {"type": "function", "function": {"name": "get_weather"}}
t = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=named, max_tokens=96, temperature=0)
msg = t.choices[0].message
assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather", t
args = json.loads(msg.tool_calls[0].function.arguments)
assert isinstance(args["city"], str), args
streamed_args = ""
for chunk in client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice=named, max_tokens=96, temperature=0, stream=True
):
    for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
        streamed_args += call.function.arguments or ""
assert streamed_args == msg.tool_calls[0].function.arguments, (streamed_args, msg)
req = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required", max_tokens=96, temperature=0)
assert req.choices[0].finish_reason == "tool_calls", req
assert all(c.function.name == "get_weather" for c in req.choices[0].message.tool_calls), req
# Streamed, the same calls arrive piece by piece, by index.
parts = {}
for chunk in client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice="required", max_tokens=96, temperature=0, stream=True
):
    for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
        name, so_far = parts.get(call.index, ("", ""))
        parts[call.index] = (name + (call.function.name or ""), so_far + (call.function.arguments or ""))
whole = [(c.function.name, json.loads(c.function.arguments)) for c in req.choices[0].message.tool_calls]
assert [(n, json.loads(a)) for _, (n, a) in sorted(parts.items())] == whole, (parts, whole)
after = client.chat.completions.create(
    model=model,
    messages=ask + [msg, {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "Sunny, 21 C"}],
    tools=tools,
    tool_choice="none",
    max_tokens=16,
    temperature=0,
)
assert after.choices[0].message.content, after

lp = client.chat.completions.create(
    model=model, messages=question, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
)
content = lp.choices[0].logprobs.content
assert content and len(content[0].top_logprobs) == 3, lp

s = client.chat.completions.create(
    model=model, messages=question, max_tokens=16, temperature=0, stop=["Paris"]
)
assert "Paris" not in s.choices[0].message.content, s

# The Responses API: the chat answer to the same question, whole or as
# typed events; a function call, and its output sent back as input items.
resp = client.responses.create(
    model=model, input=question[0]["content"], max_output_tokens=16, temperature=0
)
assert resp.output_text == text, (resp.output_text, text)
assert resp.usage.output_tokens == r.usage.completion_tokens, resp.usage
events = list(
    client.responses.create(
        model=model, input=question[0]["content"], max_output_tokens=16, temperature=0, stream=True
    )
)
streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert streamed == text, (streamed, text)
assert events[-1].type in ("response.completed", "response.incomplete"), events[-1]
assert events[-1].response.output_text == text, events[-1]
flat_tools = [{"type": "function", **tools[0]["function"]}]
called = client.responses.create(
    model=model,
    input=ask[0]["content"],
    tools=flat_tools,
    tool_choice={"type": "function", "name": "get_weather"},
    max_output_tokens=96,
    temperature=0,
)
fc = next(o for o in called.output if o.type == "function_call")
assert fc.name == "get_weather" and isinstance(json.loads(fc.arguments)["city"], str), called
answered = client.responses.create(
    model=model,
    input=ask + [fc, {"type": "function_call_output", "call_id": fc.call_id, "output": "Sunny, 21 C"}],
    tools=flat_tools,
    tool_choice="none",
    max_output_tokens=16,
    temperature=0,
)
assert answered.output_text, answered
try:
    client.responses.create(model=model, input="Hi", previous_response_id=resp.id)
    raise SystemExit("previous_response_id was accepted without stored responses")
except openai.BadRequestError as e:
    assert e.status_code == 400

# Errors arrive as the client's typed exceptions.
try:
    client.chat.completions.create(model=model, messages=question, max_tokens=0)
    raise SystemExit("max_tokens=0 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400
try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise SystemExit("a wrong API key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

print("openai client: all checks passed")
