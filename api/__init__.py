"""The HTTP edge: blueprints, request hooks, the docs page, and the error mapping."""

from flask import current_app


def backend():
    """The services the app factory built for the app handling this request."""
    return current_app.extensions["llm"]
