-- Commits a summary by compare-and-swap on its version.
-- KEYS: 1 meta 2 turns 3 summary 4 tomb
-- ARGV: 1 incarnation 2 expected_version 3 covers_through_seq 4 text 5 token_count 6 now_ms
--       7 dropped_tokens
-- Invariants: refused for a deleted, expired or re-created session (nothing is written, so no key
-- reappears); refused unless the version is still the one the summarizer read, so the turns it
-- summarized are exactly the raw head; only then are the covered raw turns dropped, in the same
-- step as the summary is written, so every seq stays either raw or covered.
if not live(KEYS[1], KEYS[4]) or redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then
  return {'not_found'}
end
local version = tonumber(redis.call('HGET', KEYS[3], 'version') or '0')
if version ~= tonumber(ARGV[2]) then
  return {'conflict', {version}}
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
local len = redis.call('LLEN', KEYS[2])
local first = last - len + 1
local covers = tonumber(ARGV[3])
if covers < first or covers > last then
  return {'bad_cover', {first, last}}
end
redis.call('LTRIM', KEYS[2], covers - first + 1, -1)
version = version + 1
redis.call('HSET', KEYS[3], 'version', fmt(version), 'covers', ARGV[3], 'text', ARGV[4],
  'tokens', ARGV[5], 'family', redis.call('HGET', KEYS[1], 'family'), 'created', ARGV[6])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[3], ttl)
end
redis.call('HINCRBY', KEYS[1], 'raw_tokens', fmt(-tonumber(ARGV[7])))
return {'ok', {version}}
