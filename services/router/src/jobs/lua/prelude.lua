-- Prepended to every script by jobs/redis.rs. Scripts take no KEYS: every key is derived from the
-- prefix and tenant (ARGV 1 and 2), which assumes one Redis primary (not Redis Cluster).
-- ARGV: 1 prefix  2 tenant  3 now (Unix ms); each script's own arguments follow.
--
-- Keys (BASE = <prefix>:<tenant>:job):
--   BASE:<id>               hash: id state attempts body created expire seq entry [cb] [lease started]
--                           [result | err_code err_msg err_reason] [last_code last_msg last_reason]
--                           [ended] [cb_attempts cb_status]
--   BASE:_index             zset: the tenant's jobs by submission sequence (ListJobs, newest first)
--   BASE:_seq               the tenant's submission counter
--   BASE:_req:<request_id>  string: the job submitted with that request_id
--   <prefix>:jobs:async           stream (group `workers`): one entry {tenant, id} per delivery
--   <prefix>:jobs:async:dead      stream: jobs given up after max_deliveries
--   <prefix>:jobs:async:delayed   zset: "<tenant> <id>" of jobs waiting out a retry backoff
--   <prefix>:jobs:async:open      counter: jobs not yet terminal (the queue's capacity)
--   <prefix>:jobs:callbacks       zset: "<tenant> <id>" of callbacks to deliver, by due time (the
--                                 outbox; a claimed entry's score is moved forward by its lease)
--   <prefix>:jobs:changes         pub/sub channel: "<tenant> <id>" after every transition
local PREFIX, TENANT, NOW = ARGV[1], ARGV[2], tonumber(ARGV[3])
local BASE = PREFIX .. ':' .. TENANT .. ':job'
local STREAM = PREFIX .. ':jobs:async'
local DEAD = STREAM .. ':dead'
local DELAYED = STREAM .. ':delayed'
local OPEN = STREAM .. ':open'
local CHANNEL = PREFIX .. ':jobs:changes'
local OUTBOX = PREFIX .. ':jobs:callbacks'
local GROUP = 'workers'

local function fmt(n)
  return string.format('%d', n)
end

local function job_key(id)
  return BASE .. ':' .. id
end

local function load(id)
  local flat = redis.call('HGETALL', job_key(id))
  if #flat == 0 then
    return nil
  end
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  return h
end

local function publish(id)
  redis.call('PUBLISH', CHANNEL, TENANT .. ' ' .. id)
end

-- Acknowledges and deletes a stream entry (nothing when the job has none).
local function ack(entry)
  if entry and entry ~= '' then
    redis.call('XACK', STREAM, GROUP, entry)
    redis.call('XDEL', STREAM, entry)
  end
end

-- Moves an open job to terminal `state`, once: frees its place in the queue and keeps the record
-- for `retention` ms.
local function finish(id, state, retention)
  local key = job_key(id)
  redis.call('HSET', key, 'state', state, 'ended', fmt(NOW))
  redis.call('HDEL', key, 'lease')
  redis.call('ZREM', DELAYED, TENANT .. ' ' .. id)
  if tonumber(redis.call('DECR', OPEN)) < 0 then
    redis.call('SET', OPEN, '0')
  end
  redis.call('PEXPIRE', key, retention)
  if redis.call('HGET', key, 'cb') == '1' then
    -- The callback's outbox entry, in the script that stored the result.
    redis.call('ZADD', OUTBOX, NOW, TENANT .. ' ' .. id)
  end
  publish(id)
end

-- Gives up on a job after `attempts` deliveries: FAILED, and an entry in the dead-letter stream.
local function dead(h, entry, retention)
  local message = 'gave up after ' .. h.attempts .. ' deliveries'
  if h.last_msg and h.last_msg ~= '' then
    message = message .. '; last error: ' .. h.last_msg
  end
  redis.call('HSET', job_key(h.id), 'err_code', h.last_code or '4', 'err_msg', message,
    'err_reason', 'MAX_DELIVERIES')
  redis.call('XADD', DEAD, '*', 'tenant', TENANT, 'id', h.id, 'attempts', h.attempts,
    'code', h.last_code or '4', 'reason', h.last_reason or '', 'message', message)
  finish(h.id, '4', retention)
  ack(entry)
end

local function done(id)
  return {'ok', redis.call('HGETALL', job_key(id))}
end
