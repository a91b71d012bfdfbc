"""The OpenAI API's side of serve.py: request bodies (pydantic) and errors in OpenAI's shape.

Bodies are validated strictly (a string is not a number) and unknown fields are ignored, as OpenAI's and vLLM's
servers do; every mistake is a 400 {"error": {"message", "type", "param", "code"}} whose message names the field.
"""

from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException


class Body(BaseModel):
    """A request body: strict types (a string is not a number), unknown fields ignored as OpenAI's server does,
    and null meaning "the default", as some clients send it."""
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def nulls_are_defaults(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# Settings this server does not implement: asked for (anything but null, false, 0 or empty), they are a 400
# rather than silently ignored.
UNSUPPORTED = ("echo", "suffix", "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
               "tools", "functions", "response_format")


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What both endpoints take: OpenAI's names, and vLLM's top_k, repetition_penalty and ignore_eos."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    ignore_eos: bool = False  # decode max_tokens whatever comes (benchmarks)

    @model_validator(mode="before")
    @classmethod
    def supported(cls, data):
        asked = [k for k in UNSUPPORTED if isinstance(data, dict) and data.get(k)]
        if asked:
            raise ValueError(f"{asked[0]} is not supported by this server")
        return data


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = ""  # an assistant's reasoning_content is not sent back: steps stay out

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


def install_error_handlers(app):
    """Every error in OpenAI's shape; a request's mistakes are one line saying which field."""
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body, e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
                                .body, 400)
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] in ("model_attributes_type", "dict_type", "missing") and first["loc"] == ("body",):
            message = "the body must be a JSON object of the request's fields"
        return JSONResponse(APIError(400, f"{param}: {message}" if param else message, param=param).body, 400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), "invalid_request_error").body, e.status_code)
