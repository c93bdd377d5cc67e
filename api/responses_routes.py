"""OpenAI's Responses API (POST /v1/responses): what `client.responses.create`, the openai Agents
SDK and LangChain's `ChatOpenAI(use_responses_api=True)` call.

A request runs as a chat completion does (same prompt building, tools, grammar, admission and
stats); this module shapes its events as a Response object, or as the Responses stream:
response.created, response.in_progress, then per output item (a message with output_text, or a
function_call) its added / delta / done events, then response.completed (or response.incomplete
when max_output_tokens cut the reply). One `_ResponseBuilder` does both, so a whole reply is
exactly the last event of its stream. Nothing is stored: ids are fresh, previous_response_id is
refused (services/dialects/responses_request.py).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from flask import Blueprint, g, jsonify

from api import backend
from api.compat import start_generation
from api.docs import document
from api.errors import openai_error
from api.json_body import json_body
from api.relay import Wire, log_result, relay
from services.dialects.chat import reply_events
from services.dialects.responses_request import RESPONSES_PARAMS, parse_responses
from services.dialects.tools import tool_events
from services.types import Finished, Token, ToolCalled

bp = Blueprint("responses", __name__)

_MODEL = "gemma-3-270m-q4_k_m.gguf"


@bp.post("/responses")
@document(params=RESPONSES_PARAMS,
          example={"model": _MODEL, "instructions": "Answer in one sentence.",
                   "input": "What is the capital of France?", "max_output_tokens": 24,
                   "temperature": 0},
          reply={"id": "resp_3f2c…", "object": "response", "created_at": 1763977200,
                 "status": "completed", "model": _MODEL, "output": [{
                     "type": "message", "id": "msg_…", "role": "assistant",
                     "status": "completed", "content": [{"type": "output_text",
                                                         "text": "Paris.", "annotations": []}]}],
                 "usage": {"input_tokens": 14, "output_tokens": 3, "total_tokens": 17,
                           "input_tokens_details": {"cached_tokens": 0},
                           "output_tokens_details": {"reasoning_tokens": 0}}, "…": "…"},
          stream_reply='data: {"type": "response.created", …}\n\n'
                       'data: {"type": "response.output_text.delta", "delta": "Paris", …}\n\n'
                       'data: {"type": "response.completed", "response": {…}}')
def create_response():
    """Answer input items (OpenAI Responses): text, or calls of the given function tools.

    The input (a string, or messages, function_call and function_call_output items) and
    instructions make the chat, rendered in the model's own chat template as chat completions
    are; text.format json_object / json_schema and forced tool calls constrain the output with
    a grammar. With max_output_tokens reached the response is "incomplete". Nothing is stored,
    so previous_response_id is refused: send the whole conversation.
    """
    request = parse_responses(json_body(), backend().config.N_CTX)
    stream = start_generation(request.model, request.prompt, request.sampling)
    builder = _ResponseBuilder(f"resp_{g.request_id}", stream.started.model, request.settings)
    events = tool_events(reply_events(stream), request.tools)
    if request.stream:
        return relay(events, stream.close,
                     Wire(builder.events, builder.error, opening=builder.opening(),
                          named_events=True))
    finished = None
    for event in events:
        builder.events(event)
        if isinstance(event, Finished):
            finished = log_result(event)
    return jsonify(builder.response(finished))


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class _ResponseBuilder:
    """One response's output items and stream events, built from its generation's events.

    Text opens a message item (and its output_text part) and streams into it; a tool call
    closes that message and adds a function_call item; the Finished closes whatever is open
    and ends the stream. Every event carries the next sequence_number.
    """

    def __init__(self, response_id: str, model: str, settings: dict):
        self._head = {"id": response_id, "object": "response", "created_at": int(time.time()),
                      "model": model, **settings}
        self._output: list[dict] = []
        self._message: dict | None = None     # the message item text is streaming into
        self._sequence = 0

    def opening(self) -> tuple[dict, ...]:
        snapshot = self._snapshot("in_progress")
        return (self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot))

    def events(self, event: Token | ToolCalled | Finished) -> list[dict]:
        """The stream events for one generation event."""
        if isinstance(event, Token):
            return self._text(event.text)
        if isinstance(event, ToolCalled):
            return [*self._close_message("completed"), *self._call(event)]
        status = "incomplete" if event.finish_reason == "length" else "completed"
        sent = [] if self._output or self._message else self._open_message()
        sent += self._close_message(status)
        return [*sent, self._event(f"response.{status}", response=self.response(event))]

    def error(self, payload: dict, status: int) -> dict:
        """The last event after a failure: Responses' `error` event, with OpenAI's error object
        under "error" too, which makes the openai package raise it (APIError)."""
        error = openai_error(payload, status)["error"]
        return self._event("error", code=error["code"], message=error["message"],
                           param=error["param"], error=error)

    def response(self, finished: Finished) -> dict:
        """The Response object of a finished generation."""
        incomplete = finished.finish_reason == "length"
        usage = finished.usage
        return {**self._snapshot("incomplete" if incomplete else "completed"),
                "completed_at": None if incomplete else int(time.time()),
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "usage": {"input_tokens": usage.prompt_tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": usage.completion_tokens,
                          "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": usage.prompt_tokens + usage.completion_tokens}}

    def _snapshot(self, status: str) -> dict:
        return {**self._head, "status": status, "error": None, "incomplete_details": None,
                "output": [dict(item) for item in self._output], "usage": None}

    def _text(self, text: str) -> list[dict]:
        sent = [] if self._message else self._open_message()
        self._message["content"][0]["text"] += text
        return [*sent, self._event("response.output_text.delta", **self._where(), delta=text,
                                   logprobs=[])]

    def _open_message(self) -> list[dict]:
        self._message = {"id": _item_id("msg"), "type": "message", "role": "assistant",
                         "status": "in_progress",
                         "content": [{"type": "output_text", "text": "", "annotations": [],
                                      "logprobs": []}]}
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._event("response.output_item.added", output_index=len(self._output),
                            item={**self._message, "content": []}),
                self._event("response.content_part.added", **self._where(), part=empty)]

    def _close_message(self, status: str) -> list[dict]:
        if self._message is None:
            return []
        message, self._message = self._message, None
        part = message["content"][0]
        where = {"item_id": message["id"], "output_index": len(self._output), "content_index": 0}
        message["status"] = status
        self._output.append(message)
        return [self._event("response.output_text.done", **where, text=part["text"],
                            logprobs=[]),
                self._event("response.content_part.done", **where, part=part),
                self._event("response.output_item.done", output_index=where["output_index"],
                            item=message)]

    def _call(self, called: ToolCalled) -> list[dict]:
        call = called.call
        item = {"id": _item_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "arguments": ""}
        where = {"item_id": item["id"], "output_index": len(self._output)}
        added = self._event("response.output_item.added", output_index=where["output_index"],
                            item=dict(item))
        item.update(arguments=call.arguments, status="completed")
        self._output.append(item)
        return [added,
                self._event("response.function_call_arguments.delta", **where,
                            delta=call.arguments),
                self._event("response.function_call_arguments.done", **where, name=call.name,
                            arguments=call.arguments),
                self._event("response.output_item.done", output_index=where["output_index"],
                            item=item)]

    def _where(self) -> dict:
        return {"item_id": self._message["id"], "output_index": len(self._output),
                "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> dict:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence - 1, **fields}
