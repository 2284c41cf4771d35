-- Stores the result and ends the job SUCCEEDED, then acknowledges its delivery: one script, so
-- the result is durable before (never after) the entry leaves the pending list.
-- ARGV: 4 id  5 entry  6 result  7 retention (ms)  8 queue
use_queue(ARGV[8])
local id, entry = ARGV[4], ARGV[5]
local h = load(id)
if not h or tonumber(h.state) >= 3 then
  ack(entry)
  return {'terminal'}
end
redis.call('HSET', job_key(id), 'result', ARGV[6])
finish(id, '3', ARGV[7])
ack(entry)
return done(id)
