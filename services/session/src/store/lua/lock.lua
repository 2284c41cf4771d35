-- Takes the summarizer lock of a live session.
-- KEYS: 1 meta 2 tomb 3 lock
-- ARGV: 1 token 2 ttl_ms
-- Invariant: never creates the lock key for a deleted or expired session.
if not live(KEYS[1], KEYS[2]) then
  return {'not_found'}
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'ok'}
end
return {'busy'}
