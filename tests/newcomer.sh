#!/usr/bin/env bash
# The README's first command (the demo) run the way a newcomer runs it: a non-root user, a fresh clone, an empty
# HOME, the system Python, and neither sshd nor rsync on the machine as that user sees it. Then checks that the
# receipt shows the job's result and nothing billing, and that nothing of the run is left running.
#
# Runs as root (to create the user and hide the tools in a private mount namespace); .ci/run calls it after the
# test suite, which installs sshd and rsync for itself. Usage: tests/newcomer.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
user=vast-newcomer
hidden=(rsync sshd)

say() { echo "newcomer: $*"; }
die() { echo "newcomer: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it creates the user '$user' and hides ${hidden[*]} in a mount namespace"

# What this script needs, and python3-venv: the one system package the README asks a newcomer for (Debian's
# python3 cannot make a virtualenv without it).
need=()
command -v git >/dev/null || need+=(git)
command -v useradd >/dev/null || need+=(passwd)
{ command -v ps && command -v pgrep; } >/dev/null || need+=(procps)
{ command -v unshare && command -v setpriv && command -v mount; } >/dev/null || need+=(util-linux mount)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
for tool in git useradd unshare setpriv mount ps pgrep /usr/bin/python3; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done

if ! id -u "$user" >/dev/null 2>&1; then
  useradd --no-create-home --shell /bin/bash "$user"
fi
uid=$(id -u "$user")
gid=$(id -g "$user")

work=$(mktemp -d "${TMPDIR:-/tmp}/vast-newcomer.XXXXXX")
keep=1
cleanup() {
  # Whatever the run left running as the newcomer is ended here by PID, and counted as a failure below.
  for pid in $(pgrep -u "$uid" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "$keep" = 0 ]; then rm -rf "$work"; else say "kept $work for inspection"; fi
}
trap cleanup EXIT

clone=$work/vast-mcp
git -c safe.directory="$repo" clone --quiet --no-hardlinks "$repo" "$clone"
mkdir "$work/home"
chown -R "$uid:$gid" "$work"
chmod 755 "$work"

# The README's first command: the first line of the first code block under "## Quick start".
first=$(awk '/^## Quick start/ {q = 1} q && /^```/ {if (inb) exit; inb = 1; next} q && inb {print; exit}' \
  "$clone/README.md")
[ -n "$first" ] || die "no command found under '## Quick start' in README.md"

# The environment a newcomer's login has, plus the machine's pip and proxy settings (not the user's).
env_args=(HOME="$work/home" USER="$user" LOGNAME="$user" SHELL=/bin/bash PATH=/usr/bin:/bin LANG=C.UTF-8)
while IFS= read -r name; do
  env_args+=("$name=${!name}")
done < <(compgen -e | grep -E '^(PIP_[A-Z_]+|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)$' || true)

# As the newcomer, in the clone: show who and what it is, prove the tools are gone, then run the command.
inner='
set -euo pipefail
cd "$1"
echo "newcomer: $(id -un) (uid $(id -u)), HOME=$HOME with $(ls -A "$HOME" | wc -l) entries, $(command -v python3) is $(python3 --version)"
found=$(command -v rsync sshd || true)
if [ -n "$found" ] || [ -x /usr/sbin/sshd ]; then echo "newcomer: still visible: $found" >&2; exit 90; fi
echo "newcomer: command -v rsync sshd finds nothing"
echo "newcomer: running the README quick start: $2"
bash -c "$2"
'
# Each folder holding a hidden tool is overlaid, in a private mount namespace, by a read-only overlayfs whose top
# layer has a whiteout for the tool: for the newcomer the file does not exist, while the machine keeps it.
declare -A tools_in=()
for tool in "${hidden[@]}"; do
  for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    if [ -e "$dir/$tool" ]; then
      real=$(realpath "$dir")
      [[ " ${tools_in[$real]:-} " == *" $tool "* ]] || tools_in[$real]="${tools_in[$real]:-} $tool"
    fi
  done
done
masks='' n=0
for dir in "${!tools_in[@]}"; do
  layer=$work/whiteouts/$n
  masks+="mkdir -p $layer && mount -t tmpfs tmpfs $layer && "
  for tool in ${tools_in[$dir]}; do masks+="mknod $layer/$tool c 0 0 && "; done
  masks+="mount -t overlay overlay -o lowerdir=$layer:$dir $dir && "
  n=$((n + 1))
done

say "fresh clone in $clone, user $user, hiding ${hidden[*]}"
log=$work/output.log
set +e
unshare --mount --propagation private -- bash -c "
  $masks true || exit 91
  exec setpriv --reuid=$uid --regid=$gid --clear-groups -- env -i $(printf '%q ' "${env_args[@]}") bash -c $(printf '%q' "$inner") inner $(printf '%q' "$clone") $(printf '%q' "$first")
" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

[ "$status" != 91 ] || die "could not hide ${hidden[*]}: this needs mount namespaces and overlayfs (as root)"
[ "$status" != 90 ] || die "rsync or sshd was still visible to the newcomer"
[ "$status" = 0 ] || die "the README's first command exited $status (output: $log)"
grep -Eq '^job: +exit code 0, test accuracy' "$log" || die "the receipt does not show the job's result"
grep -Eq 'instances left billing: 0$' "$log" || die "the receipt does not show zero instances left billing"
results=$clone/vast-demo-results
[ -s "$results/out/metrics.json" ] || die "no $results/out/metrics.json"
/usr/bin/python3 - "$results/sim-instances.json" <<'EOF' || die "the simulated cloud's instance list shows something billing"
import json, sys
rows = json.load(open(sys.argv[1]))
billing = [r for r in rows if not r["destroyed"] or r["alive_pids"]]
print(f"newcomer: the simulated cloud made {len(rows)} instance(s); {len(billing)} left billing")
sys.exit(1 if billing or not rows else 0)
EOF
# Zombies only wait for the init process to reap them; anything else of the newcomer's still running is a leak.
running() { ps -o pid=,stat=,args= -u "$uid" | awk '$2 !~ /^Z/' || true; }
for _ in $(seq 20); do [ -z "$(running)" ] && break; sleep 0.5; done
left=$(running)
[ -z "$left" ] || die "processes of the run still running: $left"
keep=0
say "OK: the demo ran as a newcomer; the receipt shows the job's result and nothing billing"
