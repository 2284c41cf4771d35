-- Prepended to every script by jobs/redis.rs. KEYS: 1 ROOT, <prefix>:{router:jobs}: every key of
-- the job store starts with it, so all of them are in ONE Redis Cluster hash slot (the braces are
-- the hash tag) and ROOT, declared, routes the call to that slot's node. Job records are a
-- tenant's and the queues are shared by every tenant, and one script moves a job and its queue
-- entry together; one slot keeps that atomic on a cluster. The price: the job store lives on one
-- master of the cluster (its replicas take over on a failover), not spread over all of them.
-- ARGV: 1 prefix  2 tenant  3 now (Unix ms); each script's own arguments follow.
--
-- Keys (BASE = ROOT:<tenant>:job, BATCH = ROOT:<tenant>:batch):
--   BASE:<id>               hash: id state attempts body created expire seq entry [cb] [lease started]
--                           [result | err_code err_msg err_reason] [last_code last_msg last_reason]
--                           [ended] [cb_attempts cb_status] [q batch] (a batch item: q = 'batch')
--   BASE:_index             zset: the tenant's jobs by submission sequence (ListJobs, newest first)
--   BASE:_seq               the tenant's submission counter
--   BASE:_req:<request_id>  string: the job submitted with that request_id
--   BATCH:<bid>             hash: id state body created expire not_before concurrency total
--                           succeeded failed cancelled started ending [ended]
--   BATCH:<bid>:todo        list: "<job id> <Job protobuf>" of the items not yet queued
--   BATCH:<bid>:active      set: the ids of its items queued or running
--   BATCH:<bid>:done        list: the ids of its ended items, in the order they ended (results)
--   BATCH:_req:<request_id> string: the batch created with that request_id
--   BATCH:_index            zset: the tenant's batches by creation sequence (ListBatches)
--   BATCH:_seq              the tenant's batch counter
--   ROOT:<q>                stream (group `workers`) of queue q (async, batch): one entry
--                           {tenant, id} per delivery
--   ROOT:<q>:dead           stream: jobs given up after max_deliveries
--   ROOT:<q>:delayed        zset: "<tenant> <id>" of jobs waiting out a retry backoff
--   ROOT:<q>:open           counter: jobs (batch: items) not yet terminal (the capacity)
--   ROOT:batch:due          zset: "<tenant> <bid>" of open batches by when the janitor must
--                           next look at them (start, expiry, cancellation in progress)
--   ROOT:callbacks          zset: "<tenant> <id>" of callbacks to deliver, by due time (the
--                           outbox; a claimed entry's score is moved forward by its lease)
--   <prefix>:jobs:changes   pub/sub channel (not a key): "<tenant> <id>" after every transition
-- A tenant's keys have `job` or `batch` after the tenant, a queue's keys never do, so no tenant
-- name (tenant ids have no ':') can make one key name the other's.
local PREFIX, TENANT, NOW = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ROOT = KEYS[1]
local BASE, BATCH
-- Selects the tenant the key functions below use (the janitor's scripts serve every tenant).
local function use_tenant(tenant)
  TENANT = tenant
  BASE = ROOT .. ':' .. tenant .. ':job'
  BATCH = ROOT .. ':' .. tenant .. ':batch'
end
use_tenant(TENANT)
local STREAM, DEAD, DELAYED, OPEN
-- Selects the queue the queue keys name: 'batch' for batch items, else 'async'. `load` selects the
-- queue of the job it loads.
local function use_queue(q)
  if q ~= 'batch' then
    q = 'async'
  end
  STREAM = ROOT .. ':' .. q
  DEAD = STREAM .. ':dead'
  DELAYED = STREAM .. ':delayed'
  OPEN = STREAM .. ':open'
end
use_queue('async')
local BATCH_STREAM = ROOT .. ':batch'
local BATCH_OPEN = BATCH_STREAM .. ':open'
local DUE = BATCH_STREAM .. ':due'
local CHANNEL = PREFIX .. ':jobs:changes'
local OUTBOX = ROOT .. ':callbacks'
local GROUP = 'workers'

local function fmt(n)
  return string.format('%d', n)
end

local function job_key(id)
  return BASE .. ':' .. id
end

-- A hash as a table, or nil when the key does not exist.
local function hash(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil
  end
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  return h
end

-- The job, or nil; selects its queue.
local function load(id)
  local h = hash(job_key(id))
  if h then
    use_queue(h.q or 'async')
  end
  return h
end

local function batch_key(bid)
  return BATCH .. ':' .. bid
end

local function floor0(key)
  if tonumber(redis.call('DECR', key)) < 0 then
    redis.call('SET', key, '0')
  end
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

local item_ended -- (bid, id, state, retention), below

-- Moves an open job (of the queue `load` selected) to terminal `state`, once: frees its place in
-- the queue, keeps the record for `retention` ms and, for a batch item, counts it in its batch.
local function finish(id, state, retention)
  local key = job_key(id)
  redis.call('HSET', key, 'state', state, 'ended', fmt(NOW))
  redis.call('HDEL', key, 'lease')
  redis.call('ZREM', DELAYED, TENANT .. ' ' .. id)
  floor0(OPEN)
  redis.call('PEXPIRE', key, retention)
  if redis.call('HGET', key, 'cb') == '1' then
    -- The callback's outbox entry, in the script that stored the result.
    redis.call('ZADD', OUTBOX, NOW, TENANT .. ' ' .. id)
  end
  publish(id)
  local bid = redis.call('HGET', key, 'batch')
  if bid then
    item_ended(bid, id, state, retention)
  end
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

-- Batches ------------------------------------------------------------------------------------
-- Batch states (BatchState): 0 being created, 1 IN_PROGRESS, 2 COMPLETED, 3 CANCELLING,
-- 4 CANCELLED, 5 EXPIRED. `ending` is '' while it runs, else why it is closing: 'cancelled' or
-- 'expired'.

local function batch_terminal(state)
  local s = tonumber(state)
  return s == 2 or s == 4 or s == 5
end

-- The job of a todo item "<id> <Job protobuf>", in `state`.
local function batch_job(bid, item, state)
  local sp = string.find(item, ' ', 1, true)
  local id, body = string.sub(item, 1, sp - 1), string.sub(item, sp + 1)
  local key = job_key(id)
  redis.call('HSET', key, 'id', id, 'state', state, 'attempts', '0', 'body', body,
    'created', fmt(NOW), 'expire', '0', 'seq', '0', 'cb', '0', 'q', 'batch', 'batch', bid)
  return id, key
end

-- Queues up to `n` of the batch's todo items on the batch stream.
local function feed(bid, n)
  local bkey = batch_key(bid)
  if n <= 0 or redis.call('LLEN', bkey .. ':todo') == 0 then
    return
  end
  redis.pcall('XGROUP', 'CREATE', BATCH_STREAM, GROUP, '0', 'MKSTREAM')
  for _ = 1, n do
    local item = redis.call('LPOP', bkey .. ':todo')
    if not item then
      return
    end
    local id, key = batch_job(bid, item, '1')
    redis.call('SADD', bkey .. ':active', id)
    local entry = redis.call('XADD', BATCH_STREAM, '*', 'tenant', TENANT, 'id', id)
    redis.call('HSET', key, 'entry', entry)
  end
end

-- Ends the batch once every item has ended: COMPLETED, or CANCELLED / EXPIRED when closing.
local function settle(bid, retention)
  local bkey = batch_key(bid)
  local b = hash(bkey)
  if not b or b.state == '0' or batch_terminal(b.state) then
    return
  end
  local ended = tonumber(b.succeeded or '0') + tonumber(b.failed or '0')
    + tonumber(b.cancelled or '0')
  if ended < tonumber(b.total) then
    return
  end
  local final = '2'
  if b.ending == 'cancelled' then
    final = '4'
  elseif b.ending == 'expired' then
    final = '5'
  end
  redis.call('HSET', bkey, 'state', final, 'ended', fmt(NOW))
  for _, k in ipairs({bkey, bkey .. ':todo', bkey .. ':done', bkey .. ':active'}) do
    redis.call('PEXPIRE', k, retention)
  end
  redis.call('ZREM', DUE, TENANT .. ' ' .. bid)
  publish(bid)
end

item_ended = function(bid, id, state, retention)
  local bkey = batch_key(bid)
  if redis.call('EXISTS', bkey) == 0 then
    return
  end
  local field = 'cancelled'
  if state == '3' then
    field = 'succeeded'
  elseif state == '4' then
    field = 'failed'
  end
  redis.call('HINCRBY', bkey, field, 1)
  redis.call('RPUSH', bkey .. ':done', id)
  redis.call('SREM', bkey .. ':active', id)
  local b = hash(bkey)
  if b.state == '1' and (b.ending or '') == '' and b.started == '1' then
    -- The item's place in the batch's concurrency goes to the next item.
    feed(bid, 1)
  end
  settle(bid, retention)
end

-- The terminal state, error code, reason and message of an item ended by its batch closing.
local function closing(ending)
  if ending == 'cancelled' then
    return '5', '1', 'BATCH_CANCELLED', 'the batch was cancelled before this item ran'
  end
  return '6', '4', 'BATCH_EXPIRED', 'the batch\'s completion window ended before this item ran'
end

-- Ends the item `id` (of a closing batch) now.
local function close_item(id, ending, retention)
  local st, code, reason, message = closing(ending)
  redis.call('HSET', job_key(id), 'err_code', code, 'err_msg', message, 'err_reason', reason)
  finish(id, st, retention)
end

-- Closes a batch (`ending` already stored): its queued items end now, and so do its running ones
-- when it expired (a cancelled batch's running items may finish); up to `chunk` todo items end
-- without running. Due again at once while todo items remain.
local function close(bid, ending, chunk, retention)
  local bkey = batch_key(bid)
  for _, id in ipairs(redis.call('SMEMBERS', bkey .. ':active')) do
    local h = load(id)
    if not h or tonumber(h.state) >= 3 then
      redis.call('SREM', bkey .. ':active', id)
    elseif h.state ~= '2' or ending == 'expired' then
      close_item(id, ending, retention)
    end
  end
  local st, code, reason, message = closing(ending)
  for _ = 1, chunk do
    local item = redis.call('LPOP', bkey .. ':todo')
    if not item then
      break
    end
    local id, key = batch_job(bid, item, st)
    redis.call('HSET', key, 'ended', fmt(NOW), 'err_code', code, 'err_msg', message,
      'err_reason', reason)
    redis.call('PEXPIRE', key, retention)
    floor0(BATCH_OPEN)
    redis.call('HINCRBY', bkey, 'cancelled', 1)
    redis.call('RPUSH', bkey .. ':done', id)
    publish(id)
  end
  if redis.call('LLEN', bkey .. ':todo') > 0 then
    redis.call('ZADD', DUE, NOW, TENANT .. ' ' .. bid)
  end
  settle(bid, retention)
end

-- Whatever is due for an open batch: its start (not_before reached: the first `concurrency` items
-- are queued), its expiry (completion window over), or the next chunk of its closing.
local function tick_batch(bid, chunk, retention)
  local bkey = batch_key(bid)
  local member = TENANT .. ' ' .. bid
  local b = hash(bkey)
  if not b or b.state == '0' or batch_terminal(b.state) then
    redis.call('ZREM', DUE, member)
    return
  end
  if (b.ending or '') == '' then
    if tonumber(b.expire) <= NOW then
      redis.call('HSET', bkey, 'ending', 'expired')
      b.ending = 'expired'
    elseif b.started ~= '1' and tonumber(b.not_before) > NOW then
      redis.call('ZADD', DUE, b.not_before, member)
      return
    else
      if b.started ~= '1' then
        redis.call('HSET', bkey, 'started', '1')
        feed(bid, tonumber(b.concurrency))
        publish(bid)
      end
      redis.call('ZADD', DUE, b.expire, member)
      return
    end
  end
  redis.call('ZREM', DUE, member)
  close(bid, b.ending, chunk, retention)
end

-- Whether the batch of job `h` is closing (its items must not run); ends the item if so.
local function closed_by_batch(h, retention)
  if not h.batch then
    return false
  end
  local ending = redis.call('HGET', batch_key(h.batch), 'ending')
  if not ending or ending == '' then
    return false
  end
  close_item(h.id, ending, retention)
  return true
end

local function batch_done(bid)
  return {'ok', redis.call('HGETALL', batch_key(bid))}
end
