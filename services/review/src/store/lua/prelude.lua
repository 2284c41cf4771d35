-- Prepended to every script by store/redis.rs. KEYS: 1 BASE, the tenant's key space
-- <prefix>:{<tenant>}:review. Every key a script touches is derived from BASE, so all are in the
-- tenant's hash slot (the braces are the Redis Cluster hash tag) and BASE, declared, routes the
-- call to that slot's node.
-- ARGV: 1 prefix  2 tenant  3 now (Unix ms); each script's own arguments follow.
--
-- Keys (BASE = <prefix>:{<tenant>}:review):
--   BASE:i:<id>            hash: id queue state prio created sla ver urg body
--                          [lease reviewer lease_exp] [verdict edited decider comment decided]
--   BASE:i:<id>:audit      list: the item's audit events (JSON), oldest first
--   BASE:audit             list: every audit event of the tenant; BASE:audit:seq their counter
--   BASE:req:<request_id>  string: the item created with that request_id
--   BASE:q:<q>:pending     zset (score 0, ordered by member = urgency key): PENDING items
--   BASE:q:<q>:all         zset (same members): every item ever in the queue, for ListItems
--   BASE:q:<q>:born        zset: PENDING items by creation time (oldest pending age)
--   BASE:q:<q>:claimed     set: CLAIMED items
--   BASE:q:<q>:sla         zset: open items by SLA deadline (breach counts)
--   BASE:q:<q>:decided     zset: items decided in the last hour, by decision time
--   BASE:q:<q>:counts      hash: decided, approved, n:<reviewer>, a:<reviewer>
--   BASE:leases            zset: CLAIMED items by lease expiry (the sweeper's work)
--   BASE:sla               zset: open items by SLA deadline (the sweeper's work)
--   <prefix>:review:changes  pub/sub channel: "<tenant> <queue> <id>" after every transition
-- No script touches the sweeper's index of tenants with something due (store/redis.rs keeps it
-- next to the scripts: it is in a slot of its own on a cluster).
local PREFIX, TENANT, NOW = ARGV[1], ARGV[2], tonumber(ARGV[3])
local BASE = KEYS[1]
local CHANNEL = PREFIX .. ':review:changes'
local LEASES = BASE .. ':leases'
local SLA = BASE .. ':sla'
local WINDOW = 3600000

local function fmt(n)
  return string.format('%d', n)
end

local function item_key(id)
  return BASE .. ':i:' .. id
end

local function qkey(queue, part)
  return BASE .. ':q:' .. queue .. ':' .. part
end

-- Ascending order is most urgent first; store/mod.rs `urgency_key` builds the same string.
local function urgency(prio, sla, created, id)
  return string.format('%010d%015d%015d:%s', 2147483647 - prio, math.max(sla, 0),
    math.max(created, 0), id)
end

-- The item as a table (nil when unknown).
local function load(id)
  local flat = redis.call('HGETALL', item_key(id))
  if #flat == 0 then
    return nil
  end
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  return h
end

-- store/mod.rs `actor` builds the same string.
local function who(name, key)
  if name ~= '' and key ~= '' then
    return name .. ' (' .. key .. ')'
  elseif name ~= '' then
    return name
  elseif key ~= '' then
    return key
  end
  return 'anonymous'
end

-- Appends one event to the tenant's trail and the item's.
local function audit(id, action, actor, detail)
  local seq = redis.call('INCR', BASE .. ':audit:seq')
  local event = cjson.encode({id = string.format('%012d', seq), item = id, action = action,
    actor = actor, time = fmt(NOW), detail = cjson.encode(detail)})
  redis.call('RPUSH', BASE .. ':audit', event)
  redis.call('RPUSH', item_key(id) .. ':audit', event)
end

local function publish(queue, id)
  redis.call('PUBLISH', CHANNEL, TENANT .. ' ' .. queue .. ' ' .. id)
end

-- When the tenant is next due for the sweeper: its earliest lease expiry or SLA deadline (nil:
-- nothing is).
local function next_due()
  local nxt = nil
  local l = redis.call('ZRANGE', LEASES, 0, 0, 'WITHSCORES')
  if l[2] then
    nxt = tonumber(l[2])
  end
  local s = redis.call('ZRANGE', SLA, 0, 0, 'WITHSCORES')
  if s[2] and (nxt == nil or tonumber(s[2]) < nxt) then
    nxt = tonumber(s[2])
  end
  return nxt
end

-- Removes an open item from every index of open items.
local function leave_open(h)
  local q = h.queue
  redis.call('ZREM', qkey(q, 'pending'), h.urg)
  redis.call('ZREM', qkey(q, 'born'), h.id)
  redis.call('SREM', qkey(q, 'claimed'), h.id)
  redis.call('ZREM', qkey(q, 'sla'), h.id)
  redis.call('ZREM', LEASES, h.id)
  redis.call('ZREM', SLA, h.id)
  redis.call('HDEL', item_key(h.id), 'lease', 'reviewer', 'lease_exp')
end

local function count_decision(queue, id, reviewer, verdict)
  local decided = qkey(queue, 'decided')
  redis.call('ZADD', decided, fmt(NOW), id)
  redis.call('ZREMRANGEBYSCORE', decided, '-inf', fmt(NOW - WINDOW))
  local counts = qkey(queue, 'counts')
  redis.call('HINCRBY', counts, 'decided', 1)
  redis.call('HINCRBY', counts, 'n:' .. reviewer, 1)
  if verdict == 1 then
    redis.call('HINCRBY', counts, 'approved', 1)
    redis.call('HINCRBY', counts, 'a:' .. reviewer, 1)
  end
end

-- nil when `lease_id` is the item's current, unlapsed lease; else the status to return.
local function not_held(h, lease_id)
  local st = tonumber(h.state)
  if st >= 3 then
    return {'terminal', h.state}
  end
  if st ~= 2 or h.lease ~= lease_id or tonumber(h.lease_exp) <= NOW then
    return {'lease_not_held'}
  end
  return nil
end

local function done(id)
  return {'ok', redis.call('HGETALL', item_key(id))}
end
