-- Releases the summarizer lock if the token still holds it.
-- KEYS: 1 lock
-- ARGV: 1 token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return {'ok'}
