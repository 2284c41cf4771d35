-- Sweep: expires up to `limit` of one tenant's reservations whose expiry has passed. Each is
-- HELD -> EXPIRED in this atomic script, so a racing Commit or Release (or another replica's
-- sweeper) finds it already settled: the hold is given back exactly once.
-- KEYS: 1 the tenant's expiry index. ARGV: 1 now, 2 limit, 3 retention ms.
-- Returns {entries looked at, reservations expired, the earliest expiry left (-1: none)}.
local zkey = KEYS[1]
local now, retention = tonumber(ARGV[1]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local expired = 0
for _, rkey in ipairs(due) do
  local r = load(rkey)
  if r and r.st == 'H' then
    expire_reservation(rkey, r, zkey, now, retention)
    expired = expired + 1
  else
    redis.call('ZREM', zkey, rkey)
  end
end
local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then
  next_due = int(tonumber(first[2]))
end
return {#due, expired, next_due}
