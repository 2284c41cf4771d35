-- Prepended to every script by store/redis.rs.
--
-- Session keys, in KEYS order where a script takes them:
--   1 meta (hash)  2 turns (list)  3 summary (hash)  4 reqs (hash)  5 reqord (zset)
--   6 tomb (string)  7 lock (string)
-- Raw turn i of the list has seq = first + i, where first = meta.last - LLEN(turns) + 1; each
-- entry is "<seq>:<protobuf Turn>" so a reader can check that invariant.

local function fmt(n)
  return string.format('%d', n)
end

-- A session is live when its metadata exists and it has no tombstone.
local function live(meta, tomb)
  return redis.call('EXISTS', tomb) == 0 and redis.call('EXISTS', meta) == 1
end

-- Everything a reply needs to describe the session.
local function state(meta, turns, summary)
  return {redis.call('HGETALL', meta), redis.call('HGETALL', summary), redis.call('LLEN', turns)}
end

-- Makes sure `key` lives at least `ttl` ms (it never shortens a longer TTL).
local function extend(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
