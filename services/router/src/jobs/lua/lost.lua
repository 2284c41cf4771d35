-- A delivery was reclaimed from a consumer that stopped: its RUNNING job goes back to QUEUED
-- (the reclaiming worker's start then counts the next attempt).
-- ARGV: 4 id  5 the reclaiming consumer
local id = ARGV[4]
local h = load(id)
if not h or tonumber(h.state) ~= 2 or h.lease == ARGV[5] then
  return {'skip'}
end
redis.call('HSET', job_key(id), 'state', '1')
redis.call('HDEL', job_key(id), 'lease')
publish(id)
return done(id)
