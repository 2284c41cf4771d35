-- A worker took a delivery: the job is RUNNING under its lease, or the delivery is dropped
-- (terminal job), the job EXPIRED (never started before its deadline) or dead-lettered.
-- A batch item whose batch is closing ends (CANCELLED or EXPIRED) instead of running.
-- ARGV: 4 id  5 entry  6 consumer  7 max_deliveries  8 retention (ms)  9 queue
use_queue(ARGV[9])
local id, entry = ARGV[4], ARGV[5]
local h = load(id)
if not h then
  ack(entry)
  return {'skip'}
end
local st = tonumber(h.state)
if st >= 3 then
  ack(entry)
  return {'skip'}
end
if tonumber(h.attempts) == 0 and tonumber(h.expire) > 0 and tonumber(h.expire) <= NOW then
  finish(id, '6', ARGV[8])
  ack(entry)
  return {'skip'}
end
if closed_by_batch(h, ARGV[8]) then
  ack(entry)
  return {'skip'}
end
if tonumber(h.attempts) >= tonumber(ARGV[7]) then
  dead(h, entry, ARGV[8])
  return {'skip'}
end
redis.call('HSET', job_key(id), 'state', '2', 'attempts', fmt(tonumber(h.attempts) + 1),
  'started', fmt(NOW), 'lease', ARGV[6], 'entry', entry)
publish(id)
return done(id)
