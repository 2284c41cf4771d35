#!/usr/bin/env bash
# Starts the local Redis Cluster the store tests run against a second time (tests/run calls it; a
# developer can run it alone): three masters and three replicas on 127.0.0.1, ports
# $WEIR_TEST_REDIS_CLUSTER_PORT (default 7000) to +5, from Debian's redis-server and redis-cli.
#
# Idempotent: a healthy cluster on those ports is reused as it is. Nodes of ours (their pid files
# under the cluster's directory) that are stale or broken are killed and the cluster is made anew;
# a port held by anything else is an error (we never kill what we did not start).
#
# Each node runs with the settings docs/redis.md recommends for the stores: AOF on, fsync every
# second, a 2 s node timeout (a failed master's replica takes over within a few seconds). Each has
# its own redis.conf, so a node that was killed rejoins with `redis-server <dir>/<port>/redis.conf`
# (the failover test does this).
#
# Prints the cluster URL for the tests on stdout, and nothing else:
#   WEIR_TEST_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002
# Usage: tests/cluster/start.sh [stop]
set -euo pipefail
cd "$(dirname "$0")/../.."

FIRST_PORT="${WEIR_TEST_REDIS_CLUSTER_PORT:-7000}"
DIR="${WEIR_TEST_REDIS_CLUSTER_DIR:-$PWD/.tools/redis-cluster}"
PORTS=$(seq "$FIRST_PORT" $((FIRST_PORT + 5)))
URL="redis+cluster://127.0.0.1:$FIRST_PORT,127.0.0.1:$((FIRST_PORT + 1)),127.0.0.1:$((FIRST_PORT + 2))"

say() { printf '%s\n' "$*" >&2; }
cli() { local port="$1"; shift; redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null; }
up() { cli "$1" ping | grep -q PONG; }
info_field() { cli "$1" "${@:3}" | tr -d '\r' | sed -n "s/^$2://p"; }

# A node of ours: the pid in its pid file is alive and is a redis-server.
our_pid() {
  local pid_file="$DIR/$1/redis.pid" pid
  [ -f "$pid_file" ] || return 1
  pid="$(cat "$pid_file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q redis-server || return 1
  echo "$pid"
}

stop_ours() {
  local port pid
  for port in $PORTS; do
    if pid="$(our_pid "$port")"; then
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    fi
  done
}

# Healthy: every node answers, every node sees the cluster ok with all 16384 slots and six nodes,
# three masters each with a replica whose link is up.
healthy() {
  local port masters=0
  for port in $PORTS; do
    up "$port" || return 1
    [ "$(info_field "$port" cluster_state cluster info)" = ok ] || return 1
    [ "$(info_field "$port" cluster_slots_assigned cluster info)" = 16384 ] || return 1
    [ "$(info_field "$port" cluster_known_nodes cluster info)" = 6 ] || return 1
    case "$(info_field "$port" role info replication)" in
      master) masters=$((masters + 1)) ;;
      slave) [ "$(info_field "$port" master_link_status info replication)" = up ] || return 1 ;;
      *) return 1 ;;
    esac
  done
  [ "$masters" = 3 ]
}

wait_healthy() {
  local tries="$1"
  for _ in $(seq 1 "$tries"); do healthy && return 0; sleep 0.2; done
  return 1
}

if [ "${1:-}" = stop ]; then
  stop_ours
  say "stopped the Redis Cluster nodes under $DIR"
  exit 0
fi

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || { say "$tool is required (Debian: apt-get install redis-server)"; exit 1; }
done

# A cluster of ours with nodes down (killed by a test, or by a reboot) gets them restarted from
# their own config, and, like one still settling after a failover, a few seconds to become
# healthy before it is judged broken and made anew.
ours=true
for port in $PORTS; do [ -f "$DIR/$port/nodes.conf" ] || ours=false; done
if ! healthy && $ours; then
  for port in $PORTS; do
    if ! our_pid "$port" >/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      say "restarting the cluster node on port $port"
      redis-server "$DIR/$port/redis.conf" || true
    fi
  done
fi
all_ours_up=true
for port in $PORTS; do { our_pid "$port" >/dev/null && up "$port"; } || all_ours_up=false; done
if healthy || { $all_ours_up && wait_healthy 50; }; then
  say "reusing the Redis Cluster on 127.0.0.1:$FIRST_PORT-$((FIRST_PORT + 5))"
  echo "WEIR_TEST_REDIS_CLUSTER_URL=$URL"
  exit 0
fi

say "starting a Redis Cluster (3 masters, 3 replicas) on 127.0.0.1:$FIRST_PORT-$((FIRST_PORT + 5)) in $DIR"
stop_ours
for port in $PORTS; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "127.0.0.1:$port is in use by a process this script did not start: stop it, or set WEIR_TEST_REDIS_CLUSTER_PORT"
    exit 1
  fi
done

for port in $PORTS; do
  node="$DIR/$port"
  rm -rf "$node"
  mkdir -p "$node"
  cat >"$node/redis.conf" <<CONF
bind 127.0.0.1
port $port
dir $node
daemonize yes
pidfile $node/redis.pid
logfile $node/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 2000
appendonly yes
appendfsync everysec
save ""
CONF
  redis-server "$node/redis.conf"
done
for port in $PORTS; do
  for _ in $(seq 1 50); do up "$port" && break; sleep 0.1; done
  up "$port" || { say "the node on port $port did not start: see $DIR/$port/redis.log"; exit 1; }
done

nodes=""
for port in $PORTS; do nodes="$nodes 127.0.0.1:$port"; done
# shellcheck disable=SC2086 # one argument per node
redis-cli --cluster create $nodes --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 \
  || { say "redis-cli --cluster create failed: see $DIR/create.log"; exit 1; }

wait_healthy 300 || { say "the Redis Cluster did not become healthy within 60 s: see $DIR/*/redis.log"; exit 1; }
say "the Redis Cluster is up"
echo "WEIR_TEST_REDIS_CLUSTER_URL=$URL"
