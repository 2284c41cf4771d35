-- Applies an SLA timeout action once: only to an open item, still in the queue the sweeper read,
-- whose deadline passed. A replica that lost the race finds nothing to do.
-- ARGV: 4 id 5 action (reject | approve | escalate) 6 expected queue 7 escalate_to
--       8 new SLA deadline (ms, escalate)
local id = ARGV[4]
local h = load(id)
if not h then
  redis.call('ZREM', SLA, id)
  return {'skip'}
end
local st = tonumber(h.state)
if st >= 3 or h.queue ~= ARGV[6] or tonumber(h.sla) > NOW then
  if st >= 3 then
    redis.call('ZREM', SLA, id)
  end
  return {'skip'}
end
leave_open(h)
local key = item_key(id)
local action = ARGV[5]
if action == 'approve' then
  redis.call('HSET', key, 'state', '3', 'verdict', '1', 'edited', '', 'decider', 'system:sla',
    'comment', '', 'decided', fmt(NOW))
  count_decision(h.queue, id, 'system:sla', 1)
  audit(id, 5, 'system:sla', {timeout_action = 'approve', verdict = 1})
elseif action == 'escalate' then
  local to, sla = ARGV[7], ARGV[8]
  local urg = urgency(tonumber(h.prio), tonumber(sla), tonumber(h.created), id)
  redis.call('ZREM', qkey(h.queue, 'all'), h.urg)
  redis.call('HSET', key, 'state', '1', 'queue', to, 'sla', sla, 'urg', urg)
  redis.call('ZADD', qkey(to, 'pending'), 0, urg)
  redis.call('ZADD', qkey(to, 'all'), 0, urg)
  redis.call('ZADD', qkey(to, 'born'), h.created, id)
  redis.call('ZADD', qkey(to, 'sla'), sla, id)
  redis.call('ZADD', SLA, sla, id)
  audit(id, 8, 'system:sla', {timeout_action = 'escalate', from = h.queue, to = to})
  publish(to, id)
else
  redis.call('HSET', key, 'state', '5')
  audit(id, 7, 'system:sla', {timeout_action = 'reject', sla_deadline_ms = tonumber(h.sla)})
end
redis.call('HINCRBY', key, 'ver', 1)
publish(h.queue, id)
return done(id)
