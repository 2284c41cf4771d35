-- Starts creating a batch (state 0, kept `creating` ms unless opened), or returns the batch
-- created with the same request_id.
-- ARGV: 4 batch id  5 request_id ('' = none)  6 body (Batch protobuf)  7 creating (ms)
local bid, rid = ARGV[4], ARGV[5]
if rid ~= '' then
  local existing = redis.call('GET', BATCH .. ':_req:' .. rid)
  if existing and redis.call('EXISTS', batch_key(existing)) == 1 then
    return batch_done(existing)
  end
end
local bkey = batch_key(bid)
redis.call('HSET', bkey, 'id', bid, 'state', '0', 'body', ARGV[6], 'created', fmt(NOW),
  'total', '0', 'succeeded', '0', 'failed', '0', 'cancelled', '0', 'started', '0', 'ending', '')
redis.call('PEXPIRE', bkey, ARGV[7])
return {'new'}
