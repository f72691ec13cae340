"""The dead-man's switch: the last line of defence, inside the instance itself.

Every instance the server rents starts a small watchdog at boot. The server refreshes a heartbeat file on the
instance over SSH; when the heartbeat is older than the lease (the laptop went offline for good, the server was
SIGKILLed and never restarted), or when the instance has run past the max runtime the user approved (plus a grace
for handing over results, since the server normally ends it first), the watchdog destroys its own instance through
the Vast API with the instance's restricted key (`CONTAINER_API_KEY`, which Vast gives every container and which
can act on that instance only). The user's API key never goes to the instance. A kept instance (`keep_instance`)
disarms its watchdog.
"""

from __future__ import annotations

import shlex

STATE = "$HOME/.vast-mcp"
HEARTBEAT_COMMAND = 'mkdir -p "$HOME/.vast-mcp" && touch "$HOME/.vast-mcp/heartbeat"'
CHECK_EVERY_S = 5

_WATCHDOG = r"""#!/bin/sh
# Destroys this instance when the vast-mcp server's heartbeat stops, or at its approved end.
# Arguments: lease seconds, API base URL, seconds the instance may run in all.
lease="$1"; url="$2"; end="$3"; d="$HOME/.vast-mcp"; born=$(date +%%s)
while sleep %(check)d; do
  [ -e "$d/keep" ] && continue
  now=$(date +%%s); last=$(stat -c %%Y "$d/heartbeat" 2>/dev/null || echo "$now")
  if [ $((now - born)) -ge "$end" ]; then
    echo "$(date -u) past the approved max runtime: destroying instance $CONTAINER_ID"
  elif [ $((now - last)) -le "$lease" ]; then
    continue
  else
    echo "$(date -u) no heartbeat for $((now - last)) s (lease ${lease} s): destroying instance $CONTAINER_ID"
  fi
  target="$url/api/v0/instances/$CONTAINER_ID/"
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 20 -X DELETE -H "Authorization: Bearer $CONTAINER_API_KEY" \
      -H "Content-Type: application/json" -d '{}' "$target" && exit 0
  else
    python3 - "$target" <<'PY' && exit 0
import os, sys, urllib.request
request = urllib.request.Request(sys.argv[1], data=b"{}", method="DELETE", headers={
    "Authorization": "Bearer " + os.environ["CONTAINER_API_KEY"], "Content-Type": "application/json"})
urllib.request.urlopen(request, timeout=20)
PY
  fi
  echo "$(date -u) the destroy request failed; trying again"
done
"""


def keep_command(keep: bool) -> str:
    """Disarm (keep) or re-arm the watchdog of an instance."""
    return f'mkdir -p "{STATE}" && ' + (f'touch "{STATE}/keep"' if keep else f'rm -f "{STATE}/keep"')


def onstart_with_watchdog(onstart: str | None, *, api_url: str, lease_s: float, runs_for_s: float) -> str:
    """The user's onstart, preceded by the lines that install and start the watchdog in the background."""
    script = _WATCHDOG % {"check": CHECK_EVERY_S}
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
