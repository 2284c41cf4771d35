-- Creates an item, or returns the one created with the same request_id.
-- ARGV: 4 request_id 5 id 6 queue 7 priority 8 sla deadline (ms) 9 body 10 actor
local req = ARGV[4]
if req ~= '' then
  local existing = redis.call('GET', BASE .. ':req:' .. req)
  if existing then
    local flat = redis.call('HGETALL', item_key(existing))
    if #flat > 0 then
      return {'exists', flat}
    end
  end
end
local id, queue, prio, sla = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local urg = urgency(prio, sla, NOW, id)
redis.call('HSET', item_key(id), 'id', id, 'queue', queue, 'state', '1', 'prio', ARGV[7],
  'created', fmt(NOW), 'sla', ARGV[8], 'ver', '1', 'urg', urg, 'body', ARGV[9])
redis.call('ZADD', qkey(queue, 'pending'), 0, urg)
redis.call('ZADD', qkey(queue, 'all'), 0, urg)
redis.call('ZADD', qkey(queue, 'born'), fmt(NOW), id)
redis.call('ZADD', qkey(queue, 'sla'), ARGV[8], id)
redis.call('ZADD', SLA, ARGV[8], id)
if req ~= '' then
  redis.call('SET', BASE .. ':req:' .. req, id)
end
audit(id, 1, ARGV[10], {queue = queue, priority = prio})
publish(queue, id)
return done(id)
