"""Operator commands: `flask --app app_factory models list | import PATH | remove NAME`."""

from __future__ import annotations

from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from services.errors import BackendError

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
