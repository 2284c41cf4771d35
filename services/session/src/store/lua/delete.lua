-- Deletes a session: tombstone first, then every other key, in one step.
-- KEYS: 1 meta 2 turns 3 summary 4 reqs 5 reqord 6 tomb 7 lock
-- ARGV: 1 session_id 2 user_base 3 tombstone_ttl_ms 4 only_user ('' = any user)
-- Invariants: after it, every write script finds no live session; UNLINK frees a long history in
-- the background, so deleting 100,000 turns does not block Redis. A stale entry of `only_user`'s
-- index (a session that expired) is removed too.
local user = redis.call('HGET', KEYS[1], 'user')
local only = ARGV[4]
if only ~= '' and user ~= only then
  redis.call('SREM', ARGV[2] .. only, ARGV[1])
  return {'not_found'}
end
if not user or redis.call('EXISTS', KEYS[6]) == 1 then
  return {'not_found'}
end
redis.call('SET', KEYS[6], '1', 'PX', ARGV[3])
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7])
if user ~= '' then
  redis.call('SREM', ARGV[2] .. user, ARGV[1])
end
return {'ok'}
