"""Small request/response helpers shared by the blueprints."""

from __future__ import annotations

from typing import Any

from flask import Request, g
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


def log_fields(**fields: Any) -> dict:
    """Add fields (model, tokens...) to this request's access-log line; returns the live dict."""
    g.log_fields.update(fields)
    return g.log_fields


class UploadRequest(Request):
    """A request whose multipart file parts can stream into a sink the view chooses.

    Werkzeug spools uploads to a temp file of its own; a model upload instead goes straight to
    a temp file in its models directory, hashed as it arrives, so a 60 GB file is written once
    and never held in memory. Views opt in by setting `upload_sink_factory`.
    """

    upload_sink_factory = None

    @cached_property
    def stream(self):
        """The body; a chunked one over `max_content_length` is 413, not cut off at the cap
        (Werkzeug stops reading there, and the truncated JSON or multipart then looked like
        a 400)."""
        if (self.content_length is not None or self.max_content_length is None
                or "wsgi.input_terminated" not in self.environ):
            return super().stream
        return _CappedStream(self.environ["wsgi.input"], self.max_content_length, is_max=True)

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        if self.upload_sink_factory is None:
            return super()._get_file_stream(total_content_length, content_type, filename,
                                            content_length)
        return self.upload_sink_factory()


class _CappedStream(LimitedStream):
    """A body of unknown length read up to its cap: one byte past the cap is a 413."""

    def on_exhausted(self) -> None:
        if self._stream.read(1):
            raise RequestEntityTooLarge()

    def readall(self) -> bytes:
        data = super().readall()
        if self.is_exhausted:
            self.on_exhausted()
        return data
