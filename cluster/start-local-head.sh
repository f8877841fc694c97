#!/usr/bin/env bash
# Start (or stop) a local Ray head on 127.0.0.1 with its own temp dir, for `cupscale submit` and Ray Data runs.
#
#   cluster/start-local-head.sh [TEMP_DIR]          start; prints the addresses to export
#   cluster/start-local-head.sh --stop [TEMP_DIR]   stop exactly that head (its process group), nothing else
#
# Environment (all optional):
#   RAY_PORT (6379)  DASHBOARD_PORT (8265)  NUM_CPUS (all)  NUM_GPUS (all)
#   AGENT_PORT  AGENT_GRPC_PORT  CLIENT_PORT  RUNTIME_ENV_PORT  (default: free ports are picked)
#   RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN: Ray's token auth. It stays on: unless RAY_AUTH_MODE=disabled
#   the head runs with RAY_AUTH_MODE=token, and a missing token file (~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) is
#   created readable by its owner only (an existing one of ours loses group/other access). Clients need
#   RAY_AUTH_MODE=token and that token.
#
# Everything binds 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops Ray from swapping 127.0.0.1 for the machine's
# routable address, and metrics collection is off (no /metrics exporter in the dashboard agent). The README's
# "What listens where" lists what remains.
#
# Why not `ray stop`: it kills every Ray process of every cluster on the machine. The head started here runs in
# its own process group, recorded in TEMP_DIR/cupscale-head.pgid, and --stop ends only that group.
set -euo pipefail

stop=0
if [[ "${1:-}" == "--stop" ]]; then stop=1; shift; fi
temp_dir="${1:-${RAY_TMPDIR:-/tmp/cupscale-ray}}"
mkdir -p "$temp_dir"
temp_dir="$(cd "$temp_dir" && pwd)"
pgid_file="$temp_dir/cupscale-head.pgid"

if [[ $stop == 1 ]]; then
  if [[ ! -s "$pgid_file" ]]; then echo "no head recorded in $pgid_file" >&2; exit 1; fi
  pgid="$(cat "$pgid_file")"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 10); do
    pgrep -g "$pgid" >/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  rm -f "$pgid_file"
  echo "stopped the Ray head of $temp_dir (process group $pgid)"
  exit 0
fi

private_token() {  # token auth on, with a token file nobody else can read
  [[ "${RAY_AUTH_MODE:-token}" == "disabled" ]] && return 0
  export RAY_AUTH_MODE=token
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
  local token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ ! -e "$token_file" ]]; then
    mkdir -p "$(dirname "$token_file")"
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_file")
  fi
  if [[ -O "$token_file" ]]; then chmod go-rwx "$token_file"; fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ray_port="${RAY_PORT:-6379}"
dashboard_port="${DASHBOARD_PORT:-8265}"
args=(--head --node-ip-address 127.0.0.1 --port "$ray_port" --temp-dir "$temp_dir"
      --include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port"
      # the agent/metrics/client ports have fixed defaults that collide with any other head on the machine
      --dashboard-agent-listen-port "${AGENT_PORT:-$(free_port)}"
      --dashboard-agent-grpc-port "${AGENT_GRPC_PORT:-$(free_port)}"
      --ray-client-server-port "${CLIENT_PORT:-$(free_port)}"
      --runtime-env-agent-port "${RUNTIME_ENV_PORT:-$(free_port)}"
      --system-config '{"enable_metrics_collection": false}'
      --disable-usage-stats)
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")

private_token
# setsid: the head's daemons inherit this new process group, which --stop ends.
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid ray start "${args[@]}" &
pgid=$!
echo "$pgid" > "$pgid_file"
if ! wait "$pgid"; then  # nothing to stop later: end what did start and leave no pid file behind
  kill -KILL -- "-$pgid" 2>/dev/null || true
  rm -f "$pgid_file"
  echo "ray start failed (see its output above); nothing is left running" >&2
  exit 1
fi

cat <<EOF
Ray head running (temp dir $temp_dir, process group $pgid).
  export RAY_ADDRESS=127.0.0.1:$ray_port                      # for ray.init / cupscale upscale|batch --address
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port  # for cupscale submit / cupscale jobs
  export RAY_AUTH_MODE=token                                   # token auth is on; the token is in ~/.ray/auth_token
Stop it with: $0 --stop $temp_dir
EOF
