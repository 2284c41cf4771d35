-- Records a callback attempt: counts it and, for a final outcome (delivered, gone, failed), stores
-- it and only then removes the outbox entry; a retry moves the entry to its next due time.
-- ARGV: 4 id  5 status ('' = retry)  6 due (Unix ms, for a retry)
local id, status = ARGV[4], ARGV[5]
local key = job_key(id)
local member = TENANT .. ' ' .. id
if redis.call('EXISTS', key) == 1 then
  redis.call('HINCRBY', key, 'cb_attempts', 1)
  if status ~= '' then
    redis.call('HSET', key, 'cb_status', status)
    publish(id)
  end
end
if status == '' then
  redis.call('ZADD', OUTBOX, ARGV[6], member)
else
  redis.call('ZREM', OUTBOX, member)
end
return {'ok'}
