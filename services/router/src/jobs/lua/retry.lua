-- A retryable failure: the job is QUEUED again, to be delivered after its backoff, or
-- dead-lettered when it has had max_deliveries.
-- ARGV: 4 id  5 entry  6 code  7 message  8 reason  9 due (Unix ms)  10 max_deliveries
--       11 retention (ms)  12 queue
use_queue(ARGV[12])
local id, entry = ARGV[4], ARGV[5]
local h = load(id)
if not h or tonumber(h.state) >= 3 then
  ack(entry)
  return {'terminal'}
end
redis.call('HSET', job_key(id), 'last_code', ARGV[6], 'last_msg', ARGV[7], 'last_reason', ARGV[8])
h.last_code, h.last_msg, h.last_reason = ARGV[6], ARGV[7], ARGV[8]
if tonumber(h.attempts) >= tonumber(ARGV[10]) then
  dead(h, entry, ARGV[11])
  return {'dead'}
end
redis.call('HSET', job_key(id), 'state', '1', 'entry', '')
redis.call('HDEL', job_key(id), 'lease')
redis.call('ZADD', DELAYED, ARGV[9], TENANT .. ' ' .. id)
ack(entry)
publish(id)
return done(id)
