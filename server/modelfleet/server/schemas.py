"""Request bodies of every API the router speaks, validated before anything reaches a backend, and the
shapes of its answers.

The answer models only document the OpenAPI (FastAPI's `responses=`): the router passes backend JSON
through without validating it, so they require the keys clients rely on and allow any others.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

# OpenAI's seed is an int64, as is the seed of Ollama and vLLM.
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


class ForwardedBody(BaseModel):
    """A request body the router re-encodes (orjson) for the backend and the cache key.

    Python's JSON parser accepts what orjson cannot write back: lone surrogates in strings, integers
    beyond 64 bits, nesting deeper than 255 levels.  Such a body is a 400 here, not a 500 later.
    """

    @model_validator(mode="before")
    @classmethod
    def forwardable(cls, data: Any) -> Any:
        try:
            # `default` passes over objects (a model the router's own code hands in): only JSON is in question.
            orjson.dumps(data, default=lambda _: None)
        except orjson.JSONEncodeError as exc:
            raise PydanticCustomError(
                "json_not_forwardable",
                "The request body cannot be forwarded ({reason}): strings must be valid Unicode, integers "
                "must fit in 64 bits, and nesting must stay under 255 levels.",
                {"reason": str(exc)},
            ) from None
        return data


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not isinstance((self.json_schema or {}).get("schema"), dict):
            raise ValueError("response_format of type json_schema needs json_schema.schema, a JSON Schema object")
        return self


class SamplingFields(ForwardedBody):
    """Fields shared by chat and text completions.

    Every field the router does not act on itself reaches the backend unchanged: tools, logprobs,
    vendor extensions (vLLM's guided decoding, Ollama's options) and fields added to the OpenAI API
    later. The backend's answer comes back unchanged too, and what a backend cannot do is its error.
    The fields typed here are validated first, so that a malformed one is a clear 400 from the router.
    """

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: Seed | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    # ModelFleet extensions.
    allow_remote: StrictBool = Field(False, description="Allow a model served by a remote provider.")
    use_cache: StrictBool = Field(True, description="false: neither read nor write the response cache.")


def examples(*bodies: dict[str, Any]) -> dict[str, Any]:
    """Request examples for the OpenAPI ("gemma" stands for any model name or alias the router serves)."""
    return {"examples": list(bodies)}


ASK = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=examples(
        {"model": "gemma", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
        {"model": "gemma", "messages": ASK, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
    ))  # fmt: skip

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=examples(
        {"model": "gemma", "prompt": "Once upon a time", "max_tokens": 8},
        {"model": "gemma", "prompt": ["Roses are red,"], "max_tokens": 8, "stream": True},
    ))  # fmt: skip

    prompt: str | list[str] = Field(description="One prompt (a list of one is accepted).")

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("send exactly one prompt per request")
            return prompt[0]
        return prompt


class AnthropicMessage(BaseModel):
    """One turn of an Anthropic conversation: text, or content blocks (text, image, tool_use, tool_result...)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(ForwardedBody):
    """Anthropic's Messages API (POST /v1/messages), passed through to the backend.

    The fields typed here are the ones the router acts on (model, max_tokens, stream) or that a client
    gets wrong most often; every other field (tool_choice, thinking, metadata, top_k...) reaches the
    backend unchanged, which serves the API itself.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=examples(
        {"model": "gemma", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]},
        {"model": "gemma", "max_tokens": 8, "system": "Answer in one word.",
         "messages": [{"role": "user", "content": "Name a colour."}], "stream": True, "temperature": 0},
    ))  # fmt: skip

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # ModelFleet extensions, not sent on.
    allow_remote: StrictBool = Field(False, description="Allow a model served by a remote provider.")
    use_cache: StrictBool = Field(True, description="false: neither read nor write the response cache.")


class CountTokensRequest(ForwardedBody):
    """POST /v1/messages/count_tokens: a Messages request without max_tokens, counted by the backend."""

    model_config = ConfigDict(extra="allow", json_schema_extra=examples(
        {"model": "gemma", "messages": [{"role": "user", "content": "Say hello."}]},
    ))  # fmt: skip

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    allow_remote: StrictBool = Field(False, description="Allow a model served by a remote provider.")


class ResponsesInputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class Decoding(BaseModel):
    """llm-pool's `decoding` object. beam_size is accepted and ignored (no backend here searches beams)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    stop: list[str] | None = Field(None, max_length=4)
    repetition_penalty: float | None = Field(None, gt=0)
    beam_size: StrictInt | None = Field(None, ge=1)


class ResponsesRequest(ForwardedBody):
    """The Responses-style API: `input` is a string or a list of messages."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=examples(
        {"model": "gemma", "input": "Say hello.", "max_output_tokens": 8},
        {"model": "gemma", "instructions": "Answer in one word.", "input": ASK[1:], "max_output_tokens": 8,
         "stream": True},
    ))  # fmt: skip

    model: str = Field(min_length=1)
    input: str | Annotated[list[ResponsesInputMessage], Field(json_schema_extra={"minItems": 1})]
    instructions: str | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    stream: StrictBool = False
    allow_remote: StrictBool = False
    use_cache: StrictBool = True
    decoding: Decoding | None = Field(None, description="llm-pool's sampling fields; the top-level ones win.")

    @field_validator("input")
    @classmethod
    def some_input(cls, value: str | list[ResponsesInputMessage]) -> str | list[ResponsesInputMessage]:
        # minItems is checked here rather than by Field(min_length=1): in a union, that error would be
        # reported as "input.str: Input should be a valid string".
        if isinstance(value, list) and not value:
            raise ValueError("give at least one message")
        return value


class GenerateRequest(ForwardedBody):
    """/v1/generate and /v1/generate/stream, the API of the systems our users come from."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=examples(
        {"prompt": "Say hello.", "max_tokens": 8},
        {"model": "gemma", "system": "Answer in one word.", "prompt": "Name a colour.", "max_tokens": 8, "seed": 7},
    ))  # fmt: skip

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1, description="Default: the router's default model.")
    system: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: Seed | None = None
    use_cache: StrictBool = True


class InferRequest(GenerateRequest):
    """/infer: the same fields as /v1/generate."""


class Answer(BaseModel):
    """A documented answer: the keys listed are always there; backends may add others."""

    model_config = ConfigDict(extra="allow")


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Answer):
    role: str
    content: str | None


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class TextChoice(Answer):
    index: int
    text: str
    finish_reason: str | None


class TextCompletion(Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class MessagesUsage(Answer):
    input_tokens: int
    output_tokens: int


class MessageAnswer(Answer):
    """An Anthropic message, as the backend answered it (`model` is the name the router serves)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: MessagesUsage


class TokenCount(Answer):
    input_tokens: int


class ModelCard(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Answer):
    object: Literal["list"]
    data: list[ModelCard]


class ResponseObject(Answer):
    """POST /v1/responses: OpenAI's response object, plus `cached` and `timings` (milliseconds), and
    llm-pool's `output_text` and `metrics` (its names, in milliseconds; null where not known)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
    cached: bool
    timings: dict[str, float]
    output_text: str
    metrics: dict[str, float | int | None]


class GenerateAnswer(Answer):
    text: str
    model: str
    cached: bool
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_approx: int
    completion_tokens_approx: int


class InferAnswer(Answer):
    response: str
    model: str
    cached: bool
    latency_ms: float


class AdminModel(Answer):
    name: str
    aliases: list[str]
    state: Literal["ready", "no_ready_replicas", "unreachable", "unloaded"]
    replicas: int
    endpoints: list[dict[str, Any]]
    queue_depth: int
    in_flight: int
    managed: dict[str, Any] | None


class LoadRequest(BaseModel):
    """Optional body of a load.  Engine settings are not overrides here: they live in the InferenceModel."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Replicas to run; by default the count before the last unload. Not for autoscaled models.",
    )


class GpuMemoryModel(Answer):
    model: str
    source: str
    gpus: int | None
    estimate: dict[str, Any] | None = None
    loaded: list[dict[str, Any]] = []


class GpuMemoryReport(Answer):
    object: Literal["gpu_memory"]
    models: list[GpuMemoryModel]
    gpus: dict[str, int]


class AdminModelAction(Answer):
    """The answer to a load or unload: done (200), or still in progress (202, poll `poll`)."""

    id: str
    action: Literal["load", "unload"]
    state: Literal["ready", "loading", "unloaded", "unloading"]
    replicas: int
    previous_replicas: int
    poll: str
    model: AdminModel | None


class AdminModelList(Answer):
    object: Literal["list"]
    data: list[AdminModel]


# Server-sent events as OpenAPI documents them (one schema per event; `: ping` comments are not events).
# Schemathesis reads each event as {"event", "data"}; `data` holds JSON unless it is OpenAI's [DONE].
ERROR_BODY_REF = {"$ref": "#/components/schemas/ErrorBody"}
ERROR_DETAIL_REF = {"$ref": "#/components/schemas/ErrorDetail"}


def json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An event's `data`: a JSON document matching `schema`."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def event_stream(description: str, event: dict[str, Any]) -> dict[str, Any]:
    """The `text/event-stream` content of a 200 response whose every event matches `event`."""
    return {"text/event-stream": {"schema": {"description": description, **event}}}


CHUNK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "object": {"enum": ["chat.completion.chunk", "text_completion"]},
        "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}},
        "usage": {"anyOf": [{"type": "null"}, Usage.model_json_schema()]},
    },
}
OPENAI_STREAM = event_stream(
    "`stream: true`: one `data:` chunk per event (chat.completion.chunk or text_completion), the usage chunk if "
    "`stream_options.include_usage`, an error body if the backend fails mid-stream, then `data: [DONE]`.",
    {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": json_data({"anyOf": [CHUNK_SCHEMA, ERROR_BODY_REF]}),
            },
        },
    },
)


ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    },
}  # fmt: skip
MESSAGES_STREAM = event_stream(
    "`stream: true`: Anthropic's events (message_start, content_block_start, content_block_delta, content_block_stop, "
    "message_delta, message_stop, ping) as the backend sent them, or an `error` event if it fails mid-stream.",
    {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": json_data({"anyOf": [{"type": "object", "required": ["type"]}, ANTHROPIC_ERROR_SCHEMA]}),
        },
    },
)
