-- Records the decision of the current lease holder.
-- ARGV: 4 id 5 lease_id 6 verdict 7 edited_content 8 comment 9 key label
local id = ARGV[4]
local h = load(id)
if not h then
  return {'not_found'}
end
local refused = not_held(h, ARGV[5])
if refused then
  return refused
end
local verdict = tonumber(ARGV[6])
leave_open(h)
redis.call('HSET', item_key(id), 'state', '3', 'verdict', ARGV[6], 'edited', ARGV[7],
  'decider', h.reviewer, 'comment', ARGV[8], 'decided', fmt(NOW))
redis.call('HINCRBY', item_key(id), 'ver', 1)
count_decision(h.queue, id, h.reviewer, verdict)
audit(id, 5, who(h.reviewer, ARGV[9]), {verdict = verdict, comment = ARGV[8],
  edited = ARGV[7] ~= ''})
publish(h.queue, id)
return done(id)
