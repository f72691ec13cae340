"""Why an instance is not ready: the last SSH failure, how often it repeated, and what a repeat probably means.

One failure says little (sshd is still starting, the key is still being installed); the same failure many times
in a row is a property of the image or the instance, and waiting longer will not fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

REPEATS_FOR_DIAGNOSIS = 5  # identical failures in a row before they are called what they probably are

_MEANING = {
    "command": (
        "The instance accepts our SSH key but the readiness command fails the same way every time: this is "
        "probably an image problem (a missing shell or command; see the detail). Waiting will not fix it: "
        "destroy the instance and use an image with a POSIX shell and coreutils (e.g. python:3.11-slim or "
        "pytorch/pytorch)."
    ),
    "auth": (
        "The instance keeps refusing our SSH key: the image may not run Vast's SSH setup (an `args` runtype "
        "or an image that replaces the SSH server). Check that the instance was created with runtype ssh; if "
        "so, destroy it and try another image or offer."
    ),
    "banner": (
        "Something accepts TCP on the SSH port but no SSH server answers: the image probably starts no sshd "
        "(an entrypoint that replaces Vast's). Destroy it and use an image launched in SSH mode."
    ),
    "ssh": (
        "The SSH handshake keeps failing the same way: probably a problem of the host or the image's SSH "
        "server. Destroy the instance and try another offer."
    ),
}
_TCP_RUNNING = (
    "Vast says the instance is running but nothing accepts SSH connections: the image probably does not start "
    "sshd, or the host's port mapping is broken. Check the instance's logs; if they show no error, destroy it "
    "and try another offer."
)


@dataclass
class SSHFailures:
    """The readiness failures of one instance, across wait_ready calls."""

    stage: str = ""
    detail: str = ""
    repeats: int = 0

    def note(self, stage: str, detail: str, *, count: bool = True) -> None:
        """Record a failed attempt (`count=False`: the final summary of attempts already counted).

        Failures at the same step count as the same failure: their details may differ in small ways (how a
        connection was cut, a timestamp in stderr) while meaning the same thing. The latest detail is kept.
        """
        if not count:
            if not self.stage:
                self.stage, self.detail, self.repeats = stage, detail, 1
            return  # the closing error restates the last attempt; keep its more precise detail
        if stage == self.stage:
            self.repeats += 1
            self.detail = detail
            return
        self.stage, self.detail, self.repeats = stage, detail, 1

    def diagnosis(self, *, running: bool) -> str | None:
        """What the failure probably means, once it has repeated enough to mean something; else None."""
        if self.repeats < REPEATS_FOR_DIAGNOSIS:
            return None
        if self.stage == "tcp":
            return _TCP_RUNNING if running else None
        return _MEANING.get(self.stage)
