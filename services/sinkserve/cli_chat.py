"""The gRPC client commands of the `sinkserve` CLI: `chat` (a terminal chat) and `session list|show|delete`.

`chat` reads with prompt_toolkit, not `input()`: a terminal in canonical mode cuts a line at 4,095 bytes, and a
paste with newlines would send each line as a message. Loads neither torch nor Ray.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
import typer

from sinkserve.client import DEFAULT_ADDRESS, SinkServeClient, generation_settings, load_defaults, save_defaults

session_app = typer.Typer(help="The tenant's sessions (through the gateway).", no_args_is_help=True)

ADDRESS_OPTION = typer.Option(None, envvar="SINKSERVE_ADDRESS", help="gateway host:port (default: what `up` saved)")
KEY_OPTION = typer.Option(None, envvar="SINKSERVE_API_KEY", help="tenant API key (default: what `tenant create` saved)")
HELP = ("Enter sends; Alt-Enter (or Esc, Enter) adds a line; pastes keep their lines. Ctrl-C stops a reply, "
        "Ctrl-D quits. /file PATH sends a file, /sessions lists yours, /info, /new, /quit.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def describe_rpc_error(err: grpc.RpcError, address: str) -> str:
    """A gRPC error in words; a gateway that is not there is named as such."""
    code, details = err.code(), err.details() or ""
    # grpc's own words for no server at the address (the gateway's UNAVAILABLE answers say something else)
    if code == grpc.StatusCode.UNAVAILABLE and any(
            words in details.lower() for words in ("failed to connect", "connection refused", "dns resolution")):
        return f"cannot reach the gateway at {address}: is `sinkserve up` running?"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{details} (create a tenant and key with `sinkserve tenant create NAME`)"
    return f"{code.name}: {details}"


def connect(address: Optional[str], api_key: Optional[str]) -> tuple[SinkServeClient, str]:
    saved = load_defaults()
    address = address or saved.get("address") or DEFAULT_ADDRESS
    api_key = api_key or saved.get("api_key")
    if not api_key:
        _fail("no API key: pass --api-key, set SINKSERVE_API_KEY, or run `sinkserve tenant create NAME` first")
    return SinkServeClient(address, api_key), address


def _call(address: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as err:
        _fail(describe_rpc_error(err, address), 1)


def _when(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if unix_ms else "-"


def _all_sessions(client: SinkServeClient) -> list:
    sessions, token = [], ""
    while True:
        page = client.list_sessions(page_size=100, page_token=token)
        sessions.extend(page.sessions)
        token = page.next_page_token
        if not token:
            return sessions


def print_sessions(sessions: list, current: str = "") -> None:
    if not sessions:
        typer.echo("no sessions")
        return
    typer.echo(f"  {'session':<34} {'turns':>6} {'tokens seen':>12} {'cache':>11}  created")
    for s in sessions:
        mark = "*" if s.session_id == current else " "
        typer.echo(f"{mark} {s.session_id:<34} {s.turns:>6} {s.tokens_seen:>12} "
                   f"{f'{s.cache_entries}/{s.cache_capacity}':>11}  {_when(s.created_unix_ms)}")


def _last_session_key(address: str, api_key: str) -> str:
    import hashlib

    return "last_session:" + hashlib.sha256(f"{address}\n{api_key}".encode()).hexdigest()[:16]


def line_reader() -> Callable[[str], str]:
    """A prompt that takes long pastes and several lines: prompt_toolkit's, Enter sends, Alt-Enter adds a line.
    Raises KeyboardInterrupt on Ctrl-C and EOFError on Ctrl-D (on an empty line)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    session: PromptSession = PromptSession(key_bindings=bindings, multiline=False)
    return lambda prompt: session.prompt(prompt)


def chat(
    address: Optional[str] = ADDRESS_OPTION,
    api_key: Optional[str] = KEY_OPTION,
    session: Optional[str] = typer.Option(None, help="resume this session"),
    new: bool = typer.Option(False, "--new", help="start a new session instead of resuming the last one"),
    system: str = typer.Option("", help="system prompt of a new session"),
    max_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0),
    repetition_penalty: float = typer.Option(1.1, min=0.0),
) -> None:
    """Chat in the terminal; replies stream as they are generated. Resumes your last session (--new for a new one).

    Enter sends, Alt-Enter adds a line, pastes of any length keep their lines. Ctrl-C stops a reply (at the
    prompt it does nothing), Ctrl-D quits. Commands: /file PATH (send a file), /sessions, /info, /new, /quit.
    """
    if session and new:
        _fail("--session and --new: give one of them")
    client, address = connect(address, api_key)
    settings = generation_settings(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty
    )
    last_key = _last_session_key(address, client.api_key or "")

    def new_session():
        created = _call(address, client.create_session, system, settings)
        save_defaults(**{last_key: created.session_id})
        return created

    def not_found(err: grpc.RpcError) -> bool:
        return err.code() == grpc.StatusCode.NOT_FOUND

    note = ""
    if session:
        current = _call(address, client.get_session, session)
        note = "resumed"
    elif not new and load_defaults().get(last_key):
        try:
            current = client.get_session(load_defaults()[last_key])
            note = "resumed your last session (--new starts another)"
        except grpc.RpcError as err:
            if not not_found(err):
                _fail(describe_rpc_error(err, address), 1)
            current = new_session()
            note = "new (your last session is gone)"
    else:
        current = new_session()
        note = "new"
    save_defaults(**{last_key: current.session_id})
    typer.secho(
        f"session {current.session_id}: {note}; turn {current.turns}, replica {current.owner_replica or '-'}, "
        f"cache {current.cache_entries}/{current.cache_capacity} entries.\n{HELP}",
        fg=typer.colors.BRIGHT_BLACK,
    )
    if current.last_turn.turn:
        typer.secho(f"last reply: {current.last_turn.text[-300:]}", fg=typer.colors.BRIGHT_BLACK)
    read = line_reader()
    try:
        while True:
            try:
                text = read("\nyou> ")
            except KeyboardInterrupt:  # at the prompt: nothing to stop; quitting is Ctrl-D
                typer.secho("(Ctrl-D quits)", fg=typer.colors.BRIGHT_BLACK)
                continue
            except EOFError:
                typer.echo()
                break
            text = text.strip()
            if not text:
                continue
            command, _, rest = text.partition(" ")
            if command == "/quit":
                break
            if command == "/help":
                typer.echo(HELP)
                continue
            if command == "/info":
                info = _call(address, client.get_session, current.session_id)
                typer.echo(f"session {info.session_id}: turns {info.turns}, tokens seen {info.tokens_seen}, cache "
                           f"{info.cache_entries}/{info.cache_capacity}, replica {info.owner_replica}")
                continue
            if command == "/sessions":
                print_sessions(_call(address, _all_sessions, client), current.session_id)
                continue
            if command == "/new":
                current = new_session()
                typer.echo(f"new session {current.session_id}")
                continue
            if command == "/file":
                path = Path(rest.strip()).expanduser()
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as err:
                    typer.secho(f"cannot read {path}: {err}", fg=typer.colors.RED, err=True)
                    continue
                typer.secho(f"[sending {path}: {len(text)} characters]", fg=typer.colors.BRIGHT_BLACK)
            elif command.startswith("/") and command[1:].isalpha():
                typer.secho(f"unknown command {command}; {HELP}", fg=typer.colors.YELLOW)
                continue
            _turn(client, address, current.session_id, text)
    finally:
        client.close()


def _turn(client: SinkServeClient, address: str, session_id: str, text: str) -> None:
    from sinkserve.cli_serving import pb_reason

    stream = client.send_message(session_id, text)
    sys.stdout.write("bot> ")
    try:
        for event in stream:
            if event.HasField("delta"):
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
            else:
                done = event.finished
                typer.secho(
                    f"\n[{pb_reason(done.finish_reason)}; {done.usage.completion_tokens} tokens; "
                    f"turn {done.turn}; cache {done.cache_entries}]",
                    fg=typer.colors.BRIGHT_BLACK,
                )
    except KeyboardInterrupt:
        stream.cancel()
        typer.secho("\n[stopped]", fg=typer.colors.YELLOW)
        time.sleep(0.2)  # let the gateway record the partial reply before the next turn
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            typer.secho(f"\nerror: {describe_rpc_error(err, address)}", fg=typer.colors.RED, err=True)


# ---------------------------------------------------------------------------------------------- session
@session_app.command("list")
def session_list(address: Optional[str] = ADDRESS_OPTION, api_key: Optional[str] = KEY_OPTION) -> None:
    """List the tenant's sessions."""
    client, address = connect(address, api_key)
    with client:
        print_sessions(_call(address, _all_sessions, client))


@session_app.command("show")
def session_show(
    session_id: str = typer.Argument(...),
    address: Optional[str] = ADDRESS_OPTION,
    api_key: Optional[str] = KEY_OPTION,
) -> None:
    """Show one session: turns, tokens seen, cache fill, replica, system prompt and its last reply."""
    from sinkserve.cli_serving import pb_reason

    client, address = connect(address, api_key)
    with client:
        s = _call(address, client.get_session, session_id)
    rows = [("session", s.session_id), ("created", _when(s.created_unix_ms)), ("turns", s.turns),
            ("tokens seen", s.tokens_seen), ("cache", f"{s.cache_entries}/{s.cache_capacity} entries"),
            ("replica", s.owner_replica or "-"), ("busy", "yes" if s.busy else "no"),
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted(s.labels.items())) or "-"),
            ("system prompt", s.system_prompt or "-")]
    if s.last_turn.turn:
        rows += [("last turn", f"{s.last_turn.turn} ({pb_reason(s.last_turn.finish_reason)}, "
                               f"{s.last_turn.usage.completion_tokens} tokens)"), ("last reply", s.last_turn.text)]
    for name, value in rows:
        typer.echo(f"{name:>14}: {value}")


@session_app.command("delete")
def session_delete(
    session_ids: list[str] = typer.Argument(..., help="one or more session ids"),
    address: Optional[str] = ADDRESS_OPTION,
    api_key: Optional[str] = KEY_OPTION,
) -> None:
    """Delete sessions (their transcripts and caches)."""
    client, address = connect(address, api_key)
    with client:
        for sid in session_ids:
            _call(address, client.delete_session, sid)
            typer.echo(f"deleted {sid}")


def register(app: typer.Typer) -> None:
    app.command(help=chat.__doc__)(chat)
    app.add_typer(session_app, name="session")
