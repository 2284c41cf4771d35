-- Creates a session.
-- KEYS: 1 meta 2 turns 3 summary 4 reqs 5 reqord 6 tomb 7 lock
-- ARGV: 1 session_id 2 user_base 3 user 4 model 5 family 6 ttl_ms 7 now_ms 8 incarnation
--       9 n, then n pairs of metadata key, value
-- Invariants: never over a tombstone or a live session; leftovers of an expired incarnation
-- (none should exist: all keys share one TTL) are removed first, so the new session starts empty.
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {'deleted'}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7])
redis.call('HSET', KEYS[1], 'user', ARGV[3], 'model', ARGV[4], 'family', ARGV[5],
  'ttl', ARGV[6], 'created', ARGV[7], 'updated', ARGV[7], 'inc', ARGV[8], 'last', '0',
  'raw_tokens', '0')
local n = tonumber(ARGV[9])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[1], 'm:' .. ARGV[10 + 2 * i], ARGV[11 + 2 * i])
end
local ttl = tonumber(ARGV[6])
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[3] ~= '' then
  local index = ARGV[2] .. ARGV[3]
  redis.call('SADD', index, ARGV[1])
  extend(index, ttl)
end
return {'ok', {}, state(KEYS[1], KEYS[2], KEYS[3])}
