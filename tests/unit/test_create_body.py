"""The create body and env parsing match what the `vastai` 1.9.1 CLI sends (Appendix A of docs/vast-api.md)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vastai.api.instances import build_create_instance_payload, resolve_runtype
from vastai.utils import parse_env

from vast_mcp.vast.create import build_create_body, parse_docker_env
from vast_mcp.vast.models import Instance

CAPTURED_ENV = '-e KEY=VAL -e B="x y" -e C=a=b -p 8080:8080 -p 7000:7000/udp -h myhost -v /a:/b -n net1'


def test_captured_env_string() -> None:
    assert parse_docker_env(CAPTURED_ENV) == {
        "KEY": "VAL",
        "B": "x y",
        "C": "a=b",
        "-p 8080:8080": "1",
        "-p 7000:7000/udp": "1",
        "-h": "myhost",
        "-v /a:/b": "1",
        "-n net1": "1",
    }


def test_captured_create_with_ssh_direct() -> None:
    body = build_create_body(
        image="pytorch/pytorch:latest",
        disk_gb=64,
        label="test",
        env=CAPTURED_ENV,
        onstart="echo hi",
        cancel_unavail=False,
    )
    assert body == {
        "client_id": "me",
        "image": "pytorch/pytorch:latest",
        "env": parse_docker_env(CAPTURED_ENV),
        "price": None,
        "disk": 64.0,
        "label": "test",
        "extra": None,
        "onstart": "echo hi",
        "image_login": None,
        "python_utf8": False,
        "lang_utf8": False,
        "use_jupyter_lab": False,
        "jupyter_dir": None,
        "force": False,
        "cancel_unavail": False,
        "template_hash_id": None,
        "user": None,
        "runtype": "ssh_direc ssh_proxy",
    }
    assert list(body) == list(build_create_instance_payload(image="x", ssh=True, direct=True))


def test_template_body_has_no_runtype_and_cancel_unavail_defaults_on() -> None:
    body = build_create_body(template_hash="abc123", disk_gb=32)
    assert "runtype" not in body
    assert body["template_hash_id"] == "abc123"
    assert body["image"] is None
    assert body["cancel_unavail"] is True


@pytest.mark.parametrize(
    ("flags", "runtype"),
    [
        ({"ssh": False, "direct": False}, "ssh"),
        ({"ssh": True, "direct": False}, "ssh_proxy"),
        ({"ssh": True, "direct": True}, "ssh_direc ssh_proxy"),
        ({"ssh": True, "direct": False, "jupyter": True}, "jupyter_proxy ssh_proxy"),
        ({"ssh": True, "direct": True, "jupyter": True}, "jupyter_direc ssh_direc ssh_proxy"),
    ],
)
def test_runtype_matches_cli(flags: dict[str, bool], runtype: str) -> None:
    assert build_create_body(image="img", **flags)["runtype"] == runtype
    assert resolve_runtype(None, default="ssh", **flags)[0] == runtype


def test_args_mode() -> None:
    body = build_create_body(image="img", args=["-c", "echo hello"])
    assert body["runtype"] == "args"
    assert body["args"] == ["-c", "echo hello"]
    with pytest.raises(ValueError, match="onstart"):
        build_create_body(image="img", args=["x"], jupyter=True)


def test_needs_image_or_template() -> None:
    with pytest.raises(ValueError, match="image or a template"):
        build_create_body()


_env_token = st.sampled_from(["-e", "-p", "-h", "-v", "-n", "-x", "A=1", "B='q r'", 'C="s t"', "8080:80", "/a:/b"])
_env_text = st.lists(st.one_of(_env_token, st.text(alphabet="ab=:/'\" -_.", max_size=8)), max_size=10).map(" ".join)


@settings(max_examples=400)
@given(_env_text)
def test_env_parsing_equals_cli(text: str) -> None:
    assert parse_docker_env(text) == parse_env(text)


def test_ssh_addresses_as_vastai_ssh_url_reads_them() -> None:
    row = {"id": 1, "ssh_host": "ssh5.vast.ai", "ssh_port": 12345, "public_ipaddr": "1.2.3.4 ", "ports": {}}
    assert Instance.model_validate({**row, "image_runtype": "ssh_proxy"}).ssh_address() == ("ssh5.vast.ai", 12345)
    jupyter = Instance.model_validate({**row, "image_runtype": "jupyter_proxy ssh_proxy"})
    assert jupyter.proxy_ssh() == ("ssh5.vast.ai", 12346)
    ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40001"}]}
    direct = Instance.model_validate({**row, "image_runtype": "ssh_direc ssh_proxy", "ports": ports})
    assert direct.ssh_address() == ("1.2.3.4", 40001)
