"""The body of `PUT /api/v0/asks/{offer_id}/`, built exactly as the `vastai` CLI builds it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PORT_CHARS = frozenset("0123456789:tcp/udp")
_VOLUME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:./_")
_NETWORK_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_OPTIONS = frozenset({"-e", "-p", "-h", "-v", "-n"})


def _split_outside_quotes(text: str) -> list[str]:
    """Split on single spaces outside quotes, keeping the quotes: the CLI's tokenizer.

    Single and double quotes toggle independently (a `'` inside `"..."` still counts), as the CLI does.
    """
    parts: list[str] = []
    current: list[str] = []
    in_single = in_double = False
    for ch in text:
        if ch == " " and not (in_single or in_double):
            parts.append("".join(current))
            current = []
            continue
        if ch == "'":
            in_single = not in_single
        elif ch == '"':
            in_double = not in_double
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_docker_env(text: str) -> dict[str, str]:
    """The CLI's reading of `--env '-e K=V -p 8080:8080 ...'` into the dict it sends.

    `-e K=V` becomes a variable (split on the first `=`, quotes around the value dropped); `-p`, `-v` and `-n`
    become keys of their own with the value "1" when their argument uses only the characters Docker allows;
    `-h host` becomes `{"-h": host}`. Anything else is ignored, as the CLI ignores it.
    """
    env: dict[str, str] = {}
    option: str | None = None
    for token in _split_outside_quotes(text):
        if option is None:
            option = token if token in _OPTIONS else None
            continue
        if option == "-e":
            key, sep, value = token.partition("=")
            if sep:
                env[key] = value.strip("'\"")
        elif option == "-p":
            if set(token) <= _PORT_CHARS:
                env[f"-p {token}"] = "1"
        elif option == "-v":
            if set(token) <= _VOLUME_CHARS:
                env[f"-v {token}"] = "1"
        elif option == "-n":
            if set(token) <= _NETWORK_CHARS:
                env[f"-n {token}"] = "1"
        else:
            env[option] = token
        option = None
    return env


def resolve_runtype(*, ssh: bool, direct: bool, jupyter: bool, args: list[str] | None) -> str:
    """The CLI's runtype for the connection flags (note Vast's spelling `_direc`)."""
    if args is not None:
        if jupyter:
            raise ValueError("Jupyter and an args entrypoint cannot be combined; put setup in onstart instead.")
        return "args"
    if jupyter:
        return "jupyter_direc ssh_direc ssh_proxy" if direct else "jupyter_proxy ssh_proxy"
    if ssh:
        return "ssh_direc ssh_proxy" if direct else "ssh_proxy"
    return "ssh"


def build_create_body(
    *,
    image: str | None = None,
    template_hash: str | None = None,
    disk_gb: float = 10,
    label: str | None = None,
    onstart: str | None = None,
    env: Mapping[str, str] | str | None = None,
    ssh: bool = True,
    direct: bool = True,
    jupyter: bool = False,
    args: list[str] | None = None,
    price: float | None = None,
    image_login: str | None = None,
    cancel_unavail: bool = True,
    force: bool = False,
    python_utf8: bool = False,
    lang_utf8: bool = False,
    user: str | None = None,
) -> dict[str, Any]:
    """Every key the CLI sends, null or false when unset, in the CLI's order.

    `cancel_unavail` defaults to True (the CLI's default is False): without it an offer that vanished between
    search and create becomes a stopped instance that quietly bills for its disk.
    """
    if image is None and template_hash is None:
        raise ValueError("Give an image or a template hash.")
    env_dict = parse_docker_env(env) if isinstance(env, str) else dict(env or {})
    body: dict[str, Any] = {
        "client_id": "me",
        "image": image,
        "env": env_dict,
        "price": price,
        "disk": float(disk_gb) if disk_gb != 10 else 10,
        "label": label,
        "extra": None,
        "onstart": onstart,
        "image_login": image_login,
        "python_utf8": python_utf8,
        "lang_utf8": lang_utf8,
        "use_jupyter_lab": False,
        "jupyter_dir": None,
        "force": force,
        "cancel_unavail": cancel_unavail,
        "template_hash_id": template_hash,
        "user": user,
    }
    if template_hash is None:
        body["runtype"] = resolve_runtype(ssh=ssh, direct=direct, jupyter=jupyter, args=args)
    if args is not None:
        body["args"] = list(args)
    return body
