"""`kiln keys` (API keys of `kiln serve --keys FILE`) and `kiln audit verify` (the request log).

    kiln keys add keys.yaml --tenant acme --name "acme CI"   # prints the key once; the file keeps its hash
    kiln keys list keys.yaml
    kiln keys revoke keys.yaml 3f9a0c1d2e4b
    kiln audit verify requests.jsonl [--head HASH]
    kiln audit verify models:/smollm2-135m-int4                # the model's promotion audit chain
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.console import fail, make_console
from pipeline.errors import KilnError
from pipeline.registry.commands import ArtifactsOpt, StoreOpt, open_registry, store_failures_reported

keys_app = typer.Typer(help="API keys for `kiln serve --keys FILE`: tenants, model grants, limits.", no_args_is_help=True)
audit_app = typer.Typer(help="Check the request log `kiln serve --request-log FILE` writes.", no_args_is_help=True)
KeysFile = Annotated[Path, typer.Argument(help="The keys file (YAML; `tenants:` written by you, `keys:` by `kiln keys add`).")]


@keys_app.command("add")
def add(file: KeysFile, tenant: Annotated[str, typer.Option(help="The tenant (under `tenants:` in FILE) the key belongs to.")],
        name: Annotated[str, typer.Option(help="A label for people (who holds the key).")] = "") -> None:
    """Create a key for TENANT: its salted hash goes into FILE, the key is printed once."""
    from pipeline.serving.tenants import new_key, read_keys_file, write_keys_file

    console = make_console()
    try:
        if not file.exists():
            raise KilnError(f"{file}: no such keys file; write its tenants first, e.g.\n"
                            f"tenants:\n  {tenant}:\n    models: [MODEL]\n    priority: standard\n    requests_per_minute: 60")
        doc = read_keys_file(file)
        key_id, key = new_key(doc, tenant, name)
        write_keys_file(file, doc)
    except KilnError as e:
        fail(console, e)
    console.print(f"key {key_id} for tenant {tenant} added to {file} (a running `kiln serve --keys` picks it up). "
                  "The key, shown once — store it now:", highlight=False)
    print(key, flush=True)


@keys_app.command("list")
def list_keys(file: KeysFile) -> None:
    """Tenants with their grants and limits, and key ids (never a key)."""
    from pipeline.serving.tenants import read_keys_file

    console = make_console()
    try:
        doc = read_keys_file(file)
    except KilnError as e:
        fail(console, e)
    for tenant, cfg in doc.tenants.items():
        limits = ", ".join(f"{k} {v:g}" for k, v in (("requests/min", cfg.requests_per_minute), ("tokens/min", cfg.tokens_per_minute),
                                                     ("concurrent", cfg.max_concurrent)) if v is not None) or "no limits"
        ids = [f"{key_id}{' (' + r.name + ')' if r.name else ''}" for key_id, r in doc.keys.items() if r.tenant == tenant]
        console.print(f"{tenant}: {cfg.priority}; models {', '.join(cfg.models)}; {limits}; keys: {', '.join(ids) or 'none'}",
                      highlight=False)


@keys_app.command("revoke")
def revoke(file: KeysFile, key_id: Annotated[str, typer.Argument(help="The key's id (`kiln keys list`).")]) -> None:
    """Remove a key: a running server refuses it from its next request."""
    from pipeline.serving.tenants import read_keys_file, write_keys_file

    console = make_console()
    try:
        doc = read_keys_file(file)
        if doc.keys.pop(key_id, None) is None:
            raise KilnError(f"{file}: no key {key_id!r} (keys: {', '.join(doc.keys) or 'none'})")
        write_keys_file(file, doc)
    except KilnError as e:
        fail(console, e)
    console.print(f"key {key_id} revoked in {file}")


@audit_app.command("verify")
@store_failures_reported
def verify(target: Annotated[str, typer.Argument(help="A request log (`kiln serve --request-log FILE`), or models:/NAME for "
                                                      "that registered model's promotion audit.")],
           head: Annotated[Optional[str], typer.Option(help="A request log's head hash kept elsewhere (printed when kiln serve "
                                                           "stopped): records cut from the end show against it.")] = None,
           tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Check every record's hash and its chain to the one before; exit 6 naming the first record
    that was edited, removed or moved."""
    from pipeline.registry.promotion import verify_audit_chain
    from pipeline.registry.refs import VersionRef, resolve
    from pipeline.serving.request_log import verify_file

    console = make_console()
    try:
        if target.startswith("models:/"):
            client = open_registry(tracking_uri, artifacts).client
            name = resolve(client, VersionRef(VersionRef.parse(target).name)).name  # a clear error when there is no such model
            done = verify_audit_chain(client, name)
            what = f"{name}'s promotion audit"
        else:
            done, what = verify_file(Path(target), head), target
    except KilnError as e:
        fail(console, e)
    console.print(f"{what}: {done.records} records, chain intact; head {done.head}", highlight=False)
