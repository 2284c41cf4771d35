-- Reads raw turns with the session they belong to, atomically.
-- KEYS: 1 meta 2 turns 3 summary 4 tomb
-- ARGV: 1 mode ('before' or 'after') 2 seq 3 limit
-- 'before': the newest `limit` raw turns with seq < ARGV[2], addressed from the tail (negative
-- indexes), so the cost does not grow with the length of the history.
-- 'after': the oldest `limit` raw turns with seq > ARGV[2].
if not live(KEYS[1], KEYS[4]) then
  return {'not_found'}
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
local len = redis.call('LLEN', KEYS[2])
local first = last - len + 1
local limit = tonumber(ARGV[3])
local from, to
if ARGV[1] == 'before' then
  to = math.min(tonumber(ARGV[2]) - 1, last)
  from = math.max(first, to - limit + 1)
else
  from = math.max(first, tonumber(ARGV[2]) + 1)
  to = math.min(last, from + limit - 1)
end
local turns = {}
if limit > 0 and from <= to then
  -- Index of seq s from the tail is s - last - 1.
  if ARGV[1] == 'before' then
    turns = redis.call('LRANGE', KEYS[2], from - last - 1, to - last - 1)
  else
    turns = redis.call('LRANGE', KEYS[2], from - first, to - first)
  end
end
return {'ok', {first}, state(KEYS[1], KEYS[2], KEYS[3]), turns}
