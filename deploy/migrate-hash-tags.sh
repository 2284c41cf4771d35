#!/usr/bin/env bash
# Moves a single Redis server's Weir data from the key layout without hash tags
# (<prefix>:<tenant>:<service>:...) to the layout with them (<prefix>:{<tenant>}:<service>:...),
# which this version reads (docs/redis.md, "Upgrading").
#
#   deploy/migrate-hash-tags.sh REDIS_URL [PREFIX]        (PREFIX: the stores' key_prefix, "weir")
#
# Stop every Weir service first: the renames are not atomic with what a running service does.
# Needs redis-cli (Debian: redis-tools). Idempotent: keys already tagged are left alone, and a key
# whose new name exists already is reported and left under its old name, never overwritten.
#
# What it does, one SCAN page per Lua call (each call is atomic; a large database is never
# blocked for long):
#   - renames every key <prefix>:<tenant>:<service>:<rest> of a Weir store (session, budget,
#     review, ratelimit, cache, router, file) to <prefix>:{<tenant>}:<service>:<rest>, keeping its
#     TTL;
#   - rewrites values that name another key of the same tenant by its old name (a budget
#     reservation's counter and budget keys, a budget idempotency record's reservation key):
#     string values and hash fields starting with <prefix>:<tenant>: get the tag;
#   - moves the budget's hold index <prefix>:budget:expiries (every tenant's held reservations by
#     expiry) into each tenant's <prefix>:{<tenant>}:budget:expiries, and marks every tenant with
#     holds, and every tenant of <prefix>:review:due, due now in the sweepers' indexes
#     <prefix>:{budget:due} and <prefix>:{review:due}, so the sweepers recompute them.
# Jobs and batches (<prefix>:<tenant>:job:..., <prefix>:<tenant>:batch:..., <prefix>:jobs:...)
# are not migrated: their store moved under <prefix>:{router:jobs}; drain the queues (no job or
# batch queued or running) before the upgrade.
set -euo pipefail

URL="${1:?usage: deploy/migrate-hash-tags.sh REDIS_URL [PREFIX]}"
PREFIX="${2:-weir}"
case "$URL" in
  *+cluster://*) echo "a single Redis server only: a cluster has no data in the old layout" >&2; exit 1 ;;
esac
command -v redis-cli >/dev/null || { echo "redis-cli is required (Debian: apt-get install redis-tools)" >&2; exit 1; }

# ARGV: 1 cursor, 2 prefix. Returns {next cursor, renamed, left under the old name}.
read -r -d '' PAGE <<'LUA' || true
local cursor, prefix = ARGV[1], ARGV[2]
local services = {session = true, budget = true, review = true, ratelimit = true, cache = true,
  router = true, file = true}
local page = redis.call('SCAN', cursor, 'MATCH', prefix .. ':*', 'COUNT', 1000)
local renamed, conflicts = 0, 0
for _, old in ipairs(page[2]) do
  local rest = string.sub(old, #prefix + 2)
  local tenant, tail = string.match(rest, '^([%w%-_%.]+):(.+)$')
  local service = tail and string.match(tail, '^([^:]+)')
  if tenant and services[service] then
    local new = prefix .. ':{' .. tenant .. '}:' .. tail
    if redis.call('EXISTS', new) == 1 then
      conflicts = conflicts + 1
    else
      redis.call('RENAME', old, new)
      renamed = renamed + 1
      local from = prefix .. ':' .. tenant .. ':'
      local to = prefix .. ':{' .. tenant .. '}:'
      local function tagged(value)
        if string.sub(value, 1, #from) == from then
          return to .. string.sub(value, #from + 1)
        end
        return nil
      end
      local kind = redis.call('TYPE', new).ok
      if kind == 'string' then
        local value = tagged(redis.call('GET', new))
        if value then redis.call('SET', new, value, 'KEEPTTL') end
      elseif kind == 'hash' then
        local flat = redis.call('HGETALL', new)
        for i = 1, #flat, 2 do
          local value = tagged(flat[i + 1])
          if value then redis.call('HSET', new, flat[i], value) end
        end
      end
    end
  end
end
return {page[1], renamed, conflicts}
LUA

# ARGV: 1 prefix. Returns {budget holds moved, tenants marked due}.
read -r -d '' INDEXES <<'LUA' || true
local prefix = ARGV[1]
local marked = {}
local function mark(service, tenant)
  redis.call('ZADD', prefix .. ':{' .. service .. ':due}:at', 'LT', 0, tenant)
  redis.call('HINCRBY', prefix .. ':{' .. service .. ':due}:gen', tenant, 1)
  marked[service .. ' ' .. tenant] = true
end
local old = prefix .. ':budget:expiries'
local holds = redis.call('ZRANGE', old, 0, -1, 'WITHSCORES')
local moved = 0
for i = 1, #holds, 2 do
  local member, at = holds[i], holds[i + 1]
  local tenant, tail = string.match(string.sub(member, #prefix + 2), '^([%w%-_%.]+):(.+)$')
  if tenant then
    local key = prefix .. ':{' .. tenant .. '}:' .. tail
    redis.call('ZADD', prefix .. ':{' .. tenant .. '}:budget:expiries', at, key)
    mark('budget', tenant)
    moved = moved + 1
  end
end
redis.call('DEL', old)
local due = prefix .. ':review:due'
for _, tenant in ipairs(redis.call('ZRANGE', due, 0, -1)) do
  mark('review', tenant)
end
redis.call('DEL', due)
local count = 0
for _ in pairs(marked) do count = count + 1 end
return {moved, count}
LUA

cli() { redis-cli -u "$URL" --no-auth-warning "$@"; }
cursor=0 renamed=0 conflicts=0
while :; do
  mapfile -t reply < <(cli EVAL "$PAGE" 0 "$cursor" "$PREFIX")
  [ "${#reply[@]}" = 3 ] || { echo "unexpected reply from Redis: ${reply[*]}" >&2; exit 1; }
  cursor="${reply[0]}"
  renamed=$((renamed + reply[1]))
  conflicts=$((conflicts + reply[2]))
  [ "$cursor" = 0 ] && break
done
mapfile -t reply < <(cli EVAL "$INDEXES" 0 "$PREFIX")
[ "${#reply[@]}" = 2 ] || { echo "unexpected reply from Redis: ${reply[*]}" >&2; exit 1; }
echo "renamed $renamed keys under $PREFIX:; moved ${reply[0]} budget holds; marked ${reply[1]} tenants due"
if [ "$conflicts" != 0 ]; then
  echo "$conflicts keys left under their old names: their new names exist already (check them by hand)" >&2
  exit 2
fi
