"""Operator commands: `flask --app app_factory models list | import PATH | remove NAME` and
`flask --app app_factory keys create | list | revoke NAME | limit NAME`."""

from __future__ import annotations

import time
from pathlib import Path

import click
from click.core import ParameterSource
from flask import current_app
from flask.cli import AppGroup

from services.errors import BackendError
from services.key_store import KEEP, KeyRecord
from services.keys import SCOPES
from services.types import NORMAL, PRIORITIES

models_cli = AppGroup("models", help="List, import and remove models.")
keys_cli = AppGroup("keys", help="Create, list and revoke API keys.")

_CHUNK = 1 << 20


@models_cli.command("list")
@click.option("--type", "model_type", type=click.Choice(["gguf", "deepseek"]), default=None)
def list_models(model_type):
    """List models with size, quantization, sha256 and trial status (and why unusable)."""
    for model in current_app.extensions["llm"].model_admin.list(model_type):
        click.echo(f"{model['name']:<48} {model['type']:<8} {model['size_bytes'] / 2**20:>9.1f} MiB "
                   f"{model['quantization'] or '?':<7} {(model['sha256'] or 'hashing…')[:16]:<16} "
                   f"{model['status']}"
                   + (f": {model['unusable_reason']}" if model["unusable_reason"] else ""))


@models_cli.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="model name (default: the file's name)")
@click.option("--type", "model_type", type=click.Choice(["gguf", "deepseek"]), default="gguf")
@click.option("--overwrite", is_flag=True, help="replace a model of the same name")
def import_model(path: Path, name, model_type, overwrite):
    """Copy a GGUF file into the models directory, checked and tried exactly like an upload."""
    admin = current_app.extensions["llm"].model_admin
    sink = admin.new_upload(model_type)
    try:
        with open(path, "rb") as source, click.progressbar(
                length=path.stat().st_size, label=f"copying and hashing {path.name}") as bar:
            for block in iter(lambda: source.read(_CHUNK), b""):
                sink.write(block)
                bar.update(len(block))
        click.echo("checking the header and trying it in a separate process…")
        model = admin.add(sink, model_type, name, path.name, overwrite, source="import")
    except BackendError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        sink.discard()
    click.echo(f"imported {model['name']} ({model['type']}, sha256 {model['sha256']})")


@models_cli.command("remove")
@click.argument("name")
def remove_model(name: str):
    """Delete a model's file and metadata."""
    try:
        removed = current_app.extensions["llm"].model_admin.remove(name)
    except BackendError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"removed {removed['removed']['name']}")


class _Limit(click.ParamType):
    """A per-key limit: a whole number (0: no limit for this key) or `default` (the server's
    RATE_LIMIT_* setting)."""

    name = "N|default"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "default":
            return None if value == "default" else value
        if str(value).isdigit():
            return int(value)
        self.fail(f"{value!r} is not a whole number or 'default'", param, ctx)


_RPM = click.option("--requests-per-minute", "rpm", type=_Limit(), default=None,
                    help="this key's API requests per minute (0: unlimited; default: "
                         "RATE_LIMIT_REQUESTS_PER_MINUTE)")
_TPM = click.option("--tokens-per-minute", "tpm", type=_Limit(), default=None,
                    help="this key's generated tokens per minute (0: unlimited; default: "
                         "RATE_LIMIT_TOKENS_PER_MINUTE)")


def _access():
    return current_app.extensions["llm"].access


def _fail(exc: BackendError) -> click.ClickException:
    """The error for the operator, with its cause (a damaged key file says why)."""
    return click.ClickException(exc.message + (f" ({exc.__cause__})" if exc.__cause__ else ""))


@keys_cli.command("create")
@click.option("--name", required=True, help="what logs, /stats and /metrics call the key")
@click.option("--scope", required=True, type=click.Choice(list(SCOPES)),
              help="inference: generate, chat, embed, read; admin: also upload, delete, "
                   "load, unload")
@click.option("--priority", type=click.Choice(PRIORITIES), default=NORMAL, show_default=True,
              help="its requests' priority, and the highest X-Request-Priority it may ask for")
@_RPM
@_TPM
def create_key(name: str, scope: str, priority: str, rpm, tpm):
    """Create a key and print it once: only its hash is kept."""
    try:
        record, secret = _access().store.create(name, scope, priority, rpm, tpm)
    except BackendError as exc:
        raise _fail(exc) from None
    click.echo(secret)
    click.echo(f"created key {record.name!r} ({_describe(record)}). Store it now: it is not "
               f"shown again. Send it as 'Authorization: Bearer <key>'.", err=True)


@keys_cli.command("list")
def list_keys():
    """List keys: name, scope, priority, limits, created, last used, revoked (never the key)."""
    access = _access()
    try:
        records = access.store.list()
    except BackendError as exc:
        raise _fail(exc) from None
    click.echo(f"{'NAME':<24} {'SCOPE':<9} {'PRIORITY':<8} {'REQ/MIN':>9} {'TOKENS/MIN':>10} "
               f"{'CREATED':<20} {'LAST USED':<20} REVOKED")
    for record in records:
        rpm, tpm = _limit(record.requests_per_minute), _limit(record.tokens_per_minute)
        click.echo(f"{record.name:<24} {record.scope:<9} {record.priority:<8} {rpm:>9} {tpm:>10} "
                   f"{_when(record.created):<20} {_when(record.last_used):<20} "
                   f"{_when(record.revoked_at)}")
    for name, scope in access.settings_keys():
        click.echo(f"{name:<24} {scope:<9} (from the {'ADMIN' if scope == 'admin' else 'API'}"
                   f"_KEYS setting)")
    if not records and not access.settings_keys():
        click.echo("no keys: the server is open to anyone who can reach it", err=True)


@keys_cli.command("revoke")
@click.argument("name")
def revoke_key(name: str):
    """Revoke a key: every server process refuses it from the next request on."""
    access = _access()
    try:
        access.store.revoke(name)
        live = [record for record in access.store.list() if record.revoked_at is None]
    except BackendError as exc:
        raise _fail(exc) from None
    click.echo(f"revoked {name!r}")
    if not live and not access.settings_keys():
        click.echo("no live key remains: the server refuses every request until you create "
                   "one (revoking never opens it)", err=True)


@keys_cli.command("limit")
@click.argument("name")
@_RPM
@_TPM
@click.pass_context
def limit_key(ctx: click.Context, name: str, rpm, tpm):
    """Set a key's own limits (a number, 0 for unlimited, or 'default' for the server's)."""
    given = {option: value if ctx.get_parameter_source(option) != ParameterSource.DEFAULT else KEEP
             for option, value in (("rpm", rpm), ("tpm", tpm))}
    if given["rpm"] is KEEP and given["tpm"] is KEEP:
        raise click.UsageError("give --requests-per-minute and/or --tokens-per-minute")
    try:
        record = _access().store.set_limits(name, given["rpm"], given["tpm"])
    except BackendError as exc:
        raise _fail(exc) from None
    click.echo(f"{record.name!r}: {_describe(record)}")


def _describe(record: KeyRecord) -> str:
    return (f"scope {record.scope}, priority {record.priority}, "
            f"{_limit(record.requests_per_minute)} requests/min, "
            f"{_limit(record.tokens_per_minute)} tokens/min")


def _limit(value: int | None) -> str:
    return "default" if value is None else "unlimited" if value == 0 else str(value)


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp)) if timestamp else "-"
