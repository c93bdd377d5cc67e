"""The domain's one error hierarchy.

Services raise these; `api/errors.py` maps each class to an HTTP status in one table. Nothing
here knows about HTTP, so the same errors can later be rendered in OpenAI's or Ollama's shape.
"""


class BackendError(Exception):
    """Base of every error a client may see; `code` is the stable snake_case identifier."""

    code = "backend_error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(BackendError):
    code = "invalid_request"


class ContextOverflow(InvalidRequest):
    """The prompt plus the requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class InvalidModelFile(InvalidRequest):
    """An uploaded file is not a GGUF model this server accepts (checked before llama.cpp)."""

    code = "invalid_model_file"


class ChecksumMismatch(InvalidRequest):
    """An upload's bytes do not match the sha256 the client sent with it: nothing was kept."""

    code = "sha256_mismatch"


class UnloadableModel(BackendError):
    """llama.cpp failed or crashed loading a new file in a separate process: refused."""

    code = "model_unloadable"


class InsufficientMemory(BackendError):
    """Loading the model would need more memory than is available."""

    code = "insufficient_memory"


class ModelNotFound(BackendError):
    code = "model_not_found"


class ModelUnusable(ModelNotFound):
    """The named model failed its trial (models/probe.py) and is never loaded: no servable
    model by that name. The message carries the reason."""

    code = "model_unusable"


class RetryLater(BackendError):
    """A refusal that may pass if the client tries again after `retry_after` seconds (the
    Retry-After header)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class ModelOnTrial(RetryLater, ModelNotFound):
    """The named model's trial has not finished yet; it cannot be served until it passes."""

    code = "model_on_trial"

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message, retry_after)


class ModelConflict(BackendError):
    code = "model_conflict"


class PayloadTooLarge(BackendError):
    code = "payload_too_large"


class Unauthorized(BackendError):
    code = "unauthorized"


class Forbidden(BackendError):
    """A valid key whose scope does not cover this route (an inference key on an admin route)."""

    code = "forbidden"


class KeyStoreUnavailable(BackendError):
    """The key file cannot be read while the server runs (replaced, damaged, a disk error):
    requests are refused, never let through. The cause goes to errors.log, not to clients."""

    code = "key_store_unavailable"


class HostNotAllowed(BackendError):
    """The Host header names no host in ALLOWED_HOSTS (a DNS-rebinding page, say)."""

    code = "host_not_allowed"


class OriginNotAllowed(BackendError):
    """A state-changing request from a web origin that CORS_ORIGINS does not name."""

    code = "origin_not_allowed"


class InsufficientStorage(BackendError):
    """The disk filled while a file was written; nothing partial was kept."""

    code = "insufficient_storage"


class ClientTimeout(BackendError):
    """The client stalled while sending its request."""

    code = "request_timeout"


class TooBusy(RetryLater):
    """Admission refused: MAX_CONCURRENT_REQUESTS are already in flight."""

    code = "too_many_requests"


class RateLimited(TooBusy):
    """The key used up its requests or generated tokens for the current minute (its limit,
    remaining and reset go out as X-RateLimit-* headers)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int = 1, headers: dict | None = None):
        super().__init__(message, retry_after)
        self.headers = dict(headers or {})


class QueueTimeout(BackendError):
    """Admitted, but no worker or model instance became free within QUEUE_TIMEOUT."""

    code = "queue_timeout"


class ShuttingDown(BackendError):
    code = "shutting_down"


class GenerationTimeout(BackendError):
    """The generation ran past REQUEST_TIMEOUT and was stopped."""

    code = "generation_timeout"


class ModelLoadError(BackendError):
    """llama.cpp could not load a model file that is on disk (a server-side problem)."""

    code = "model_load_failed"


class DecodeFailed(BackendError):
    """llama.cpp refused a batch (llama_decode returned an error): a server-side fault; the
    sequences in that batch end with it and their slots are cleared."""

    code = "decode_failed"


class ClientGone(BackendError):
    """The client closed its connection while its request waited: nobody reads the reply."""

    code = "client_disconnected"


class JobCancelled(Exception):
    """The work's caller stopped waiting (client gone, caller timed out, shutdown): not an
    error of the request, so it maps to no status; the outcome is "cancelled"."""


class ChatTemplateError(BackendError):
    """A model's chat template failed, ran over its time or size bound, or tried what its
    sandbox forbids (and did not run): a fault of the model file, not of the server."""

    code = "chat_template_error"


class ConfigError(Exception):
    """A setting has an invalid value; raised at start-up, never during a request."""
