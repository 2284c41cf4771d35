-- Cancels an open item; a terminal one is returned unchanged.
-- ARGV: 4 id 5 reason 6 actor
local id = ARGV[4]
local h = load(id)
if not h then
  return {'not_found'}
end
if tonumber(h.state) >= 3 then
  return {'unchanged', redis.call('HGETALL', item_key(id))}
end
leave_open(h)
redis.call('HSET', item_key(id), 'state', '4')
redis.call('HINCRBY', item_key(id), 'ver', 1)
audit(id, 6, ARGV[6], {reason = ARGV[5]})
publish(h.queue, id)
return done(id)
