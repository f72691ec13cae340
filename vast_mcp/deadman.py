"""The dead-man's switch: the last line of defence, inside the instance itself.

Every instance the server rents starts a small watchdog at boot. The server refreshes a heartbeat file on the
instance over SSH; when the heartbeat is older than the lease (the laptop went offline for good, the server was
SIGKILLed and never restarted), or when the instance has run past the max runtime the user approved (plus a grace
for handing over results, since the server normally ends it first), the watchdog destroys its own instance through
the Vast API with the instance's restricted key (`CONTAINER_API_KEY`, which Vast gives every container and which
can act on that instance only). The user's API key never goes to the instance. A kept instance (`keep_instance`)
disarms its watchdog. An instance running an approved `run_job` is let run its job to the approved max runtime
without heartbeats, and is stopped rather than destroyed when its results have not been fetched (see `_WATCHDOG`).
"""

from __future__ import annotations

import shlex

STATE = "$HOME/.vast-mcp"
HEARTBEAT_COMMAND = 'mkdir -p "$HOME/.vast-mcp" && touch "$HOME/.vast-mcp/heartbeat"'
CHECK_EVERY_S = 5

_WATCHDOG = r"""#!/bin/sh
# Destroys this instance when the vast-mcp server's heartbeat stops, or at its approved end. An instance running
# an approved run (the file run: its job folder, then results=0|1) is treated differently: while the job runs
# it keeps running without heartbeats; once the job has ended with results not yet fetched (no file fetched),
# or at the approved end, it is STOPPED, not destroyed: compute billing ends and the disk keeps the results.
# Arguments: lease seconds, API base URL, seconds the instance may run in all.
lease="$1"; url="$2"; end="$3"; d="$HOME/.vast-mcp"; born=$(date +%%s)
while sleep %(check)d; do
  [ -e "$d/keep" ] && continue
  now=$(date +%%s); last=$(stat -c %%Y "$d/heartbeat" 2>/dev/null || echo "$now")
  job=none; keeps=0
  if [ -f "$d/run" ]; then
    jd=$(sed -n 1p "$d/run"); job=running
    [ -f "$jd/exit" ] && job=ended
    grep -qx "results=1" "$d/run" && [ ! -e "$d/fetched" ] && keeps=1
  fi
  action=destroy
  if [ $((now - born)) -ge "$end" ]; then
    [ "$job" != none ] && [ "$keeps" = 1 ] && action=stop
    echo "$(date -u) past the approved max runtime: $action instance $CONTAINER_ID"
  elif [ $((now - last)) -le "$lease" ]; then
    continue
  elif [ "$job" = running ]; then
    continue
  else
    [ "$job" = ended ] && [ "$keeps" = 1 ] && action=stop
    echo "$(date -u) no heartbeat for $((now - last)) s (lease ${lease} s), job $job: $action instance $CONTAINER_ID"
  fi
  target="$url/api/v0/instances/$CONTAINER_ID/"
  if [ "$action" = stop ]; then method=PUT; body='{"state": "stopped"}'; else method=DELETE; body='{}'; fi
  py=$(command -v python3 || command -v python)
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 20 -X "$method" -H "Authorization: Bearer $CONTAINER_API_KEY" \
      -H "Content-Type: application/json" -d "$body" "$target" && exit 0
  elif wget --help 2>&1 | grep -q -- --method; then
    wget -q -O - -T 20 --method="$method" --header="Authorization: Bearer $CONTAINER_API_KEY" \
      --header="Content-Type: application/json" --body-data="$body" "$target" && exit 0
  elif [ -n "$py" ]; then
    "$py" - "$target" "$method" "$body" <<'PY' && exit 0
import os, sys, urllib.request
request = urllib.request.Request(sys.argv[1], data=sys.argv[3].encode(), method=sys.argv[2], headers={
    "Authorization": "Bearer " + os.environ["CONTAINER_API_KEY"], "Content-Type": "application/json"})
urllib.request.urlopen(request, timeout=20)
PY
  fi
  echo "$(date -u) the $action request failed; trying again"
done
"""


# Run at wait_ready, in the container's environment: can the watchdog work here? It needs an HTTP client that
# can send DELETE (curl, GNU wget or Python; BusyBox's wget cannot) and the instance's own key, and that key
# must read the instance. One `name=value` per line.
_CHECK = r"""
url=%(url)s
if [ -f "$HOME/.vast-mcp/deadman.sh" ]; then echo installed=1; else echo installed=0; fi
py=$(command -v python3 || command -v python)
if command -v curl >/dev/null 2>&1; then client=curl
elif wget --help 2>&1 | grep -q -- --method; then client=wget
elif [ -n "$py" ]; then client=python
else client=; fi
echo "client=$client"
if [ -z "$CONTAINER_API_KEY" ] || [ -z "$CONTAINER_ID" ]; then echo key=0; exit 0; fi
echo key=1
target="$url/api/v0/instances/$CONTAINER_ID/"
case $client in
  curl) code=$(curl -s -o /dev/null -w '%%{http_code}' -m 10 -H "Authorization: Bearer $CONTAINER_API_KEY" "$target") ;;
  wget) if wget -q -O /dev/null -T 10 --header="Authorization: Bearer $CONTAINER_API_KEY" "$target"; then code=200
        else code=error; fi ;;
  python) code=$("$py" - "$target" 2>/dev/null <<'PY'
import os, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["CONTAINER_API_KEY"]})
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("error")
PY
) ;;
  *) code= ;;
esac
echo "read=$code"
exit 0
"""


def check_command(api_url: str) -> str:
    """The script that tells whether the watchdog can work on this instance (see `judge`)."""
    return _CHECK % {"url": shlex.quote(api_url.rstrip("/"))}


def judge(output: str) -> str | None:
    """None when the watchdog can destroy this instance; otherwise what stops it, in plain words."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep and name in ("installed", "client", "key", "read"):
            values[name] = value.strip()
    if values.get("installed") == "0":
        return "its watchdog is not installed (the onstart script did not run)"
    if not values.get("client"):
        return (
            "the image has no curl, GNU wget or Python, so its watchdog cannot call the Vast API to destroy it "
            "if this server goes away"
        )
    if values.get("key") != "1":
        return "CONTAINER_API_KEY or CONTAINER_ID is not set in the container, so its watchdog cannot authenticate"
    # 429: Vast knew the key and only refused the pace, so the watchdog's one DELETE will be heard.
    if values.get("read") not in ("200", "429"):
        return (
            f"its watchdog could not reach the Vast API with the instance's own key (answer: "
            f"{values.get('read') or 'none'})"
        )
    return None


def run_marker_command(job_id: str, *, results: bool) -> str:
    """Tell the watchdog that this instance runs an approved run's job (see `_WATCHDOG`)."""
    folder = f"{STATE}/jobs/{job_id}"
    return f'mkdir -p "{STATE}" && printf "%s\\nresults=%d\\n" "{folder}" {int(results)} > "{STATE}/run"'


FETCHED_COMMAND = f'mkdir -p "{STATE}" && touch "{STATE}/fetched"'
"""The run's results are downloaded: nothing on this instance is worth keeping any more."""


def keep_command(keep: bool) -> str:
    """Disarm (keep) or re-arm the watchdog of an instance."""
    return f'mkdir -p "{STATE}" && ' + (f'touch "{STATE}/keep"' if keep else f'rm -f "{STATE}/keep"')


def watchdog_script() -> str:
    """The watchdog itself (`sh deadman.sh LEASE_S API_URL RUNS_FOR_S`), as the onstart installs it."""
    return _WATCHDOG % {"check": CHECK_EVERY_S}


def onstart_with_watchdog(onstart: str | None, *, api_url: str, lease_s: float, runs_for_s: float) -> str:
    """The user's onstart, preceded by the lines that install and start the watchdog in the background."""
    script = watchdog_script()
    install = "\n".join(
        [
            "# vast-mcp dead-man's switch (see `vast-mcp` docs: it destroys this instance if the server goes away)",
            f'mkdir -p "{STATE}" && touch "{STATE}/heartbeat"',
            f"cat > \"{STATE}/deadman.sh\" <<'VAST_MCP_DEADMAN'\n{script}VAST_MCP_DEADMAN",
            f'nohup setsid sh "{STATE}/deadman.sh" {int(lease_s)} {shlex.quote(api_url.rstrip("/"))} {int(runs_for_s)} '
            f'>> "{STATE}/deadman.log" 2>&1 < /dev/null &',
        ]
    )
    return install + ("\n" + onstart if onstart else "") + "\n"
