-- Opens a batch whose items were all added: IN_PROGRESS, its items counted against the batch
-- queue's capacity, started at once unless not_before is ahead. A concurrent create with the same
-- request_id that opened first wins: this one is deleted and that one returned.
-- ARGV: 4 batch id  5 request_id  6 expire (Unix ms)  7 not_before (Unix ms)  8 concurrency
--       9 capacity  10 request_id retention (ms)  11 retention (ms)  12 close chunk
local bid, rid = ARGV[4], ARGV[5]
local bkey = batch_key(bid)
local b = hash(bkey)
if not b or b.state ~= '0' then
  return {'gone'}
end
local rkey = BATCH .. ':_req:' .. rid
if rid ~= '' then
  local existing = redis.call('GET', rkey)
  if existing and existing ~= bid and redis.call('EXISTS', batch_key(existing)) == 1 then
    redis.call('DEL', bkey, bkey .. ':todo')
    return batch_done(existing)
  end
end
local total = tonumber(b.total)
if tonumber(redis.call('GET', BATCH_OPEN) or '0') + total > tonumber(ARGV[9]) then
  redis.call('DEL', bkey, bkey .. ':todo')
  return {'full'}
end
if rid ~= '' then
  redis.call('SET', rkey, bid, 'PX', ARGV[10])
end
redis.call('INCRBY', BATCH_OPEN, total)
local seq = redis.call('INCR', BATCH .. ':_seq')
redis.call('ZADD', BATCH .. ':_index', seq, bid)
redis.call('HSET', bkey, 'state', '1', 'expire', ARGV[6], 'not_before', ARGV[7],
  'concurrency', ARGV[8])
redis.call('PERSIST', bkey)
redis.call('PERSIST', bkey .. ':todo')
tick_batch(bid, tonumber(ARGV[12]), ARGV[11])
publish(bid)
return batch_done(bid)
