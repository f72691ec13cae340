"""The pure parts of the image work: which profile an image reference gets, how listings and hash lines from
images without GNU extensions are read, and how the dead-man's switch check is judged."""

from __future__ import annotations

import pytest

from vast_mcp.deadman import judge
from vast_mcp.remote.transfer import _parse_sums, parse_listing
from vast_mcp.sim.images import CATALOGUE, DEFAULT, EXAMPLES, profile_for


@pytest.mark.parametrize(
    ("image", "profile"),
    [
        ("python:3.11-slim", "python-slim"),
        ("python:3.12-slim-bookworm", "python-slim"),
        ("pytorch/pytorch", "pytorch-runtime"),
        ("docker.io/pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime", "pytorch-runtime"),
        ("pytorch/pytorch:2.3.1-cuda12.1-cudnn8-devel", "pytorch-devel"),
        ("nvidia/cuda:12.1.1-runtime-ubuntu22.04", "cuda-base"),
        ("nvidia/cuda:12.1.1-devel-ubuntu22.04", "cuda-devel"),
        ("nvidia/cuda:11.0-base-ubuntu18.04", "cuda-base"),
        ("Ubuntu:22.04", "ubuntu-22.04"),
        ("busybox", "busybox"),
        ("python:3.11", "default-slim"),
        ("someone/private:tag", "default-slim"),
        (None, "default-slim"),
    ],
)
def test_every_reference_gets_a_profile_and_unknown_ones_the_slim_default(image: str | None, profile: str) -> None:
    assert profile_for(image).name == profile


def test_catalogue_examples_name_their_own_profile_and_nothing_is_the_full_host() -> None:
    assert {profile_for(ref).name for ref in EXAMPLES.values()} == {p.name for p in (*CATALOGUE, DEFAULT)}
    # Only Vast's own images bring rsync; the default is slim.
    assert {p.name for p in (*CATALOGUE, DEFAULT) if p.has("rsync")} == {"vastai-base", "vastai-pytorch"}
    assert not DEFAULT.has("curl") and DEFAULT.has("python3")


def test_listing_without_find_printf_is_read_like_gnu_find() -> None:
    gnu = b"d\t4096\t1700000000.5\t\t./proj\0f\t3\t1700000001.0\t\t./proj/a b\0l\t5\t1700000002.0\tb.bin\t./proj/link\0"
    stat_form = (
        b"M41ed\t4096\t1700000000\t./proj\0M81a4\t3\t1700000001\t./proj/a b\0"
        b"Ma1ff\t5\t1700000002\t./proj/link\0L./proj/link\tb.bin\0"
    )
    assert (
        parse_listing(gnu)
        == parse_listing(stat_form)
        == {
            "proj": ("d", 4096, 1700000000, ""),
            "proj/a b": ("f", 3, 1700000001, ""),
            "proj/link": ("l", 5, 1700000002, "b.bin"),
        }
    )


def test_hash_lines_without_z_including_gnu_escaped_names() -> None:
    digest = "ab" * 32
    # sha256sum without -z, its newlines turned into NULs; GNU marks a name holding a newline with a backslash.
    data = f"{digest}  ./plain.txt\0\\{digest}  ./two\\nlines\\\\x\0".encode()
    assert _parse_sums(data) == {"plain.txt": digest, "two\nlines\\x": digest}


@pytest.mark.parametrize(
    ("output", "verdict"),
    [
        ("installed=1\nclient=curl\nkey=1\nread=200\n", None),
        ("installed=1\nclient=python\nkey=1\nread=200\n", None),
        ("installed=1\nclient=\n", "no curl, GNU wget or Python"),
        ("installed=1\nclient=curl\nkey=0\n", "CONTAINER_API_KEY"),
        ("installed=1\nclient=wget\nkey=1\nread=error\n", "could not reach the Vast API"),
        ("installed=0\nclient=curl\nkey=1\nread=200\n", "not installed"),
    ],
)
def test_watchdog_check_is_judged_in_plain_words(output: str, verdict: str | None) -> None:
    said = judge(output)
    assert said == verdict if verdict is None else (said is not None and verdict in said)
