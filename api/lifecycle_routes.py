"""Model lifecycle routes: load and unload a model now, and the stream of model events."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("lifecycle", __name__)
