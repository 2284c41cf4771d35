-- Ends the job FAILED with its error, then acknowledges its delivery.
-- ARGV: 4 id  5 entry  6 code  7 message  8 reason  9 retention (ms)  10 queue
use_queue(ARGV[10])
local id, entry = ARGV[4], ARGV[5]
local h = load(id)
if not h or tonumber(h.state) >= 3 then
  ack(entry)
  return {'terminal'}
end
redis.call('HSET', job_key(id), 'err_code', ARGV[6], 'err_msg', ARGV[7], 'err_reason', ARGV[8])
finish(id, '4', ARGV[9])
ack(entry)
return done(id)
