"""Background jobs on an instance: detached, with an exit code, followed by byte cursor.

All state lives on the instance, in `~/.vast-mcp/jobs/<id>/`: `pid` (the job's session and process group id),
`started`, `command`, `log` (stdout and stderr), `exit` (written by the wrapper when the command ends) and
`killed` (written by cancel). So a job outlives dropped connections and restarts of this process, and any new
client can find it again by id or list it.
"""

from __future__ import annotations

import codecs
import re
import secrets
import shlex
import time
from dataclasses import dataclass
from typing import Literal

from ..errors import JobNotFoundError, RemoteCommandError
from .connect import RemoteHost
from .words import remote_path_word

JobState = Literal["running", "exited", "killed", "lost"]

JOBS_DIR = "$HOME/.vast-mcp/jobs"
MAX_WAIT_S = 300.0
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TICK = 0.2  # seconds between the remote loop's looks at the log: new output reaches the caller within this


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    exit_code: int | None  # for "exited"; a code above 128 means the command died of signal (code - 128)
    pid: int | None
    started_at: float | None  # Unix time on the instance
    log_bytes: int
    command: str = ""

    @property
    def finished(self) -> bool:
        return self.state != "running"


@dataclass(frozen=True)
class LogChunk:
    """Log text from `cursor` up to `next_cursor` (byte offsets), and whether more is already waiting."""

    job_id: str
    text: str
    cursor: int
    next_cursor: int
    more: bool
    status: JobStatus


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def _check_id(job_id: str) -> str:
    if not _ID.match(job_id):
        raise ValueError(f"Job id {job_id!r} is not valid: use letters, digits, '.', '_' and '-' (max 64).")
    return job_id


# Sets st (running|exited|killed|lost), code and pid for the job in $d. The wrapper's environment carries the
# job id, so a pid reused by some other process after a reboot is not mistaken for the job.
_STATE = r"""
state() {
  pid=$(cat "$d/pid" 2>/dev/null); code=""
  if [ -f "$d/exit" ]; then
    code=$(cat "$d/exit"); st=exited
    if [ -f "$d/killed" ]; then st=killed; fi
    return 0
  fi
  alive=0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    if [ -r "/proc/$pid/environ" ]; then
      tr '\0' '\n' < "/proc/$pid/environ" | grep -qx "VAST_MCP_JOB=$id" && alive=1
    else
      alive=1
    fi
  fi
  if [ $alive = 0 ] && [ -f "$d/exit" ]; then
    state  # it ended between the first look at exit and the look at its pid: read its exit code
    return 0
  fi
  if [ $alive = 1 ]; then st=running
  elif [ -f "$d/exit" ]; then
    # The job ended between the first look and the pid check: its exit code is there now.
    code=$(cat "$d/exit"); st=exited
    if [ -f "$d/killed" ]; then st=killed; fi
  elif [ -f "$d/killed" ]; then st=killed
  elif [ -z "$pid" ] && [ -f "$d/starting" ]; then st=running
  else st=lost
  fi
}
"""

_START = r"""
set -e
umask 077
id=%(id)s
d="%(jobs)s/$id"
if [ -e "$d" ]; then echo "job $id exists already" >&2; exit 17; fi
mkdir -p "$d"
cat > "$d/cmd"
printf '%%s' %(command)s > "$d/command"
date +%%s > "$d/started"
: > "$d/log"
: > "$d/starting"
if command -v bash >/dev/null 2>&1; then run=bash; else run=sh; fi
# setsid: its own session and process group, so closing SSH cannot hang it up and cancel can kill all of it.
# Without it (a rare image) the job still detaches through nohup; cancel then reaches it by its pid.
if command -v setsid >/dev/null 2>&1; then detach=setsid; else detach=nohup; fi
VAST_MCP_JOB=$id $detach sh -c '
  d=$1; run=$2
  echo $$ > "$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid"
  rm -f "$d/starting"
  $run "$d/cmd" > "$d/log" 2>&1 < /dev/null
  echo $? > "$d/exit.tmp" && mv "$d/exit.tmp" "$d/exit"
' vast-mcp-job "$d" "$run" < /dev/null > /dev/null 2>&1 &
i=0
while [ ! -s "$d/pid" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
set +e
"""

_REPORT = r"""
size=$(wc -c < "$d/log" 2>/dev/null || echo 0)
size=$((size + 0))
started=$(cat "$d/started" 2>/dev/null)
echo "$st ${code:--} ${pid:--} ${started:--} $size"
"""


def _script(job_id: str, body: str) -> str:
    return f'id={shlex.quote(job_id)}\nd="{JOBS_DIR}/$id"\n{_STATE}\n{body}'


def _parse_status(job_id: str, header: str, command: str = "") -> JobStatus:
    parts = header.split()
    if not parts or parts[0] == "missing":
        raise JobNotFoundError(f"No job {job_id} on this instance. List jobs to see which exist.")
    st, code, pid, started, size = parts[:5]
    state: JobState = st  # type: ignore[assignment]
    return JobStatus(
        job_id=job_id,
        state=state,
        exit_code=int(code) if code.lstrip("-").isdigit() and state in ("exited", "killed") else None,
        pid=int(pid) if pid.isdigit() else None,
        started_at=float(started) if started.isdigit() else None,
        log_bytes=int(size) if size.isdigit() else 0,
        command=command,
    )


async def start_job(
    host: RemoteHost,
    command: str,
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    job_id: str | None = None,
) -> JobStatus:
    """Start `command` (bash if the instance has it, else sh) in the background and return once it runs.

    `env` values go into a 0600 script on the instance, never onto a command line where `ps` would show them.
    """
    job_id = _check_id(job_id or new_job_id())
    # The script may hold secrets: it unlinks itself as soon as the shell has it open (the shell keeps reading
    # through its descriptor), so nothing is left on the instance's disk.
    lines = ['rm -f -- "$0"']
    if env:
        lines.append("set -a")
    for name, value in (env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"Environment variable name {name!r} is not valid.")
        lines.append(f"{name}={shlex.quote(value)}")
    if env:
        lines.append("set +a")
    # A folder named `-P` or `-` is still a folder, not an option of cd.
    lines.append(f"cd {remote_path_word(cwd)} || exit 126" if cwd else 'cd "$HOME"')
    lines.append(command)
    script = _START % {"id": shlex.quote(job_id), "jobs": JOBS_DIR, "command": shlex.quote(command)}
    await host.check(
        script + "\n" + _STATE + "state\n" + _REPORT,
        stdin=("\n".join(lines) + "\n").encode(),
        what=f"starting job {job_id}",
    )
    return await job_status(host, job_id)


async def job_status(host: RemoteHost, job_id: str) -> JobStatus:
    out = await host.check(
        _script(_check_id(job_id), '[ -d "$d" ] || { echo missing; exit 0; }\nstate\n' + _REPORT + 'cat "$d/command"'),
        what=f"reading the state of job {job_id}",
    )
    header, _, command = out.partition("\n")
    return _parse_status(job_id, header, command)


async def list_jobs(host: RemoteHost) -> list[JobStatus]:
    """Every job on the instance, oldest first."""
    body = (
        f'for d in {JOBS_DIR}/*/; do\n  [ -d "$d" ] || continue\n  d=${{d%/}}; id=${{d##*/}}\n  state\n'
        + _REPORT.replace('echo "$st', 'echo "$id $st')
        + '  printf "%s\\n" "$(head -c 200 "$d/command" | tr "\\n" " ")"\ndone\n'
    )
    out = await host.check(_STATE + body, what="listing the jobs")
    lines = out.splitlines()
    jobs = []
    for header, command in zip(lines[::2], lines[1::2], strict=False):
        job_id, _, rest = header.partition(" ")
        jobs.append(_parse_status(job_id, rest, command))
    return sorted(jobs, key=lambda j: (j.started_at or 0, j.job_id))


async def tail_job(
    host: RemoteHost,
    job_id: str,
    *,
    cursor: int | None = 0,
    max_bytes: int = 64 * 1024,
    wait: float = 0.0,
    until_end: bool = False,
) -> LogChunk:
    """Log text after byte `cursor` (None: the last `max_bytes`), at most `max_bytes` of it.

    With `wait`, the instance itself waits up to that many seconds for new output or the job's end before
    answering, so following a job costs one round trip per call. With `until_end`, new output alone does not
    end the wait: the job's end, a full `max_bytes` page or `wait` does (one answer per page, not per line).
    Pass `next_cursor` back to continue: no byte is lost or repeated, even when a UTF-8 character straddles
    the cap.
    """
    wait = min(max(wait, 0.0), MAX_WAIT_S)
    ticks = int(wait / _TICK)
    start = -1 if cursor is None else max(cursor, 0)
    body = f"""
[ -d "$d" ] || {{ echo missing; exit 0; }}
c={start}; max={max_bytes}; n={ticks}; i=0; need={max_bytes if until_end else 1}
while :; do
  state
  size=$(wc -c < "$d/log" 2>/dev/null || echo 0); size=$((size + 0))
  if [ $c -lt 0 ]; then c=$((size > max ? size - max : 0)); break; fi
  [ $size -ge $((c + need)) ] && break
  [ $st != running ] && break
  [ $i -ge $n ] && break
  sleep {_TICK}; i=$((i + 1))
done
{_REPORT.strip()}
echo "$c"
[ $size -gt $c ] && tail -c +$((c + 1)) "$d/log" | head -c $max
exit 0
"""
    res = await host.run_bytes(
        _script(_check_id(job_id), body),
        time_limit=wait + 60,
        output_cap=max_bytes + 4096,
        what=f"reading the log of job {job_id}",
    )
    if res.exit_code != 0 or res.stdout.cut:
        raise RemoteCommandError(f"Could not read the log of job {job_id}: {res.stderr.text().strip()[-500:]}")
    header, _, rest = bytes(res.stdout.head + res.stdout.tail).partition(b"\n")
    start_line, _, data = rest.partition(b"\n")
    status = _parse_status(job_id, header.decode("ascii", "replace"))
    begin = int(start_line)
    final = status.finished and begin + len(data) >= status.log_bytes
    text, used = _decode_prefix(data, final=final)
    next_cursor = begin + used
    return LogChunk(
        job_id=job_id,
        text=text,
        cursor=begin,
        next_cursor=next_cursor,
        more=status.log_bytes > next_cursor,
        status=status,
    )


def _decode_prefix(data: bytes, *, final: bool) -> tuple[str, int]:
    """Decode as much of `data` as forms whole characters; returns the text and how many bytes it used."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=final)
    pending = len(decoder.getstate()[0])
    return text, len(data) - pending


async def cancel_job(host: RemoteHost, job_id: str, *, grace: float = 5.0) -> JobStatus:
    """Stop the job: SIGTERM to its whole process group, SIGKILL after `grace` seconds if anything is left."""
    ticks = int(min(max(grace, 0.0), 60.0) / _TICK)
    body = f"""
[ -d "$d" ] || {{ echo missing; exit 0; }}
state
if [ $st = running ] && [ -n "$pid" ]; then
  touch "$d/killed"
  # `kill -SIG -PGID`, not `kill -SIG -- -PGID`: BusyBox's shell rejects the `--`. A job started without setsid
  # has no group of its own: then every process carrying its id in the environment is signalled.
  signal_job() {{
    kill -$1 -$pid 2>/dev/null && return 0
    for p in /proc/[0-9]*; do
      if tr '\\0' '\\n' < "$p/environ" 2>/dev/null | grep -qx "VAST_MCP_JOB=$id"; then
        kill -$1 "${{p#/proc/}}" 2>/dev/null
      fi
    done
    return 0
  }}
  signal_job TERM
  i=0
  while {{ kill -0 -$pid || kill -0 $pid; }} 2>/dev/null && [ $i -lt {ticks} ]; do sleep {_TICK}; i=$((i + 1)); done
  signal_job KILL
  sleep {_TICK}
fi
state
{_REPORT.strip()}
"""
    out = await host.check(_script(_check_id(job_id), body), time_limit=grace + 30, what=f"cancelling job {job_id}")
    return _parse_status(job_id, out.splitlines()[0] if out else "missing")


def format_chunk(chunk: LogChunk) -> str:
    """A one-line summary of a chunk for humans and models."""
    s = chunk.status
    where = f"bytes {chunk.cursor}-{chunk.next_cursor} of {s.log_bytes}"
    state = f"exited with code {s.exit_code}" if s.state == "exited" else s.state
    more = "; more is waiting, call again with next_cursor" if chunk.more else ""
    return f"job {chunk.job_id} {state}; {where}{more}"
