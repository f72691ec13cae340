"""Docker image references, checked before anything is quoted or rented.

The grammar is Docker's (distribution/reference): `[host[:port]/]path[:tag][@algorithm:hex]`, where the path is
lower-case components separated by `/`, and the first component is a registry host only when it has a `.` or a
`:`, or is `localhost`. An empty, blank or multi-line name would otherwise reach Vast and fail on the machine,
after the user approved and paid for it.
"""

from __future__ import annotations

import json
import re

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PORT = r"(?::[0-9]{1,5})"
# A host has a dot, a port or a bracketed IPv6 address, or is localhost; else the first part is a path component.
_HOST = rf"(?:(?:{_HOST_PART}(?:\.{_HOST_PART})+|\[[0-9a-fA-F:]+\]|localhost){_PORT}?|{_HOST_PART}{_PORT})"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_REFERENCE = re.compile(rf"(?:(?P<host>{_HOST})/)?(?P<path>{_PATH})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?")
NAME_MAX = 255
EXAMPLE = "'pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime' or 'ghcr.io/org/app:v1'"


def check_image(image: str) -> str:
    """`image` when it is a valid Docker reference, else a `ValueError` that says what is wrong with it."""
    shown = json.dumps(image[:80], ensure_ascii=True) + ("..." if len(image) > 80 else "")
    if not image.strip():
        raise ValueError(f"image is empty: name a Docker image such as {EXAMPLE}")
    if image != image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"image {shown} contains spaces or line breaks: give one Docker image name such as {EXAMPLE}")
    match = _REFERENCE.fullmatch(image)
    if match is None:
        raise ValueError(f"image {shown} is not a Docker image reference: {_why(image)}; e.g. {EXAMPLE}")
    if match.end("path") > NAME_MAX:
        raise ValueError(f"image {shown} has a name longer than {NAME_MAX} characters; use the image's real name")
    return image


def _why(image: str) -> str:
    """The most likely reason a reference failed, in words."""
    name = image.split("@", 1)[0]
    if "@" in image and not re.fullmatch(_DIGEST, image.split("@", 1)[1]):
        return "the part after '@' must be a digest like sha256:<64 hex digits>"
    path = name.split("/", 1)[1] if "/" in name and _looks_like_host(name.split("/", 1)[0]) else name
    last = path.rsplit("/", 1)[-1]
    if ":" in last and not re.fullmatch(_TAG, last.split(":", 1)[1]):
        return "the tag after ':' may hold only letters, digits, '_', '.' and '-' (at most 128, not first '.'/'-')"
    repo = path.rsplit(":", 1)[0] if ":" in last else path
    if repo != repo.lower():
        return "the repository path must be lower-case"
    if "//" in repo or repo.startswith("/") or repo.endswith("/"):
        return "the repository path has an empty component"
    return "use lower-case letters, digits and '.', '_', '-' separators in the path, with an optional :tag and @digest"


def _looks_like_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost"
