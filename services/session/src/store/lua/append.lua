-- Appends turns.
-- KEYS: 1 meta 2 turns 3 summary 4 reqs 5 reqord 6 tomb
-- ARGV: 1 user_base 2 now_ms 3 request_id 4 expected_last_seq ('' = any) 5 fingerprint
--       6 max_request_ids 7 nf, then nf pairs of tokenizer family and the turns' token count in
--       it ('*' for any other family), then n, then n encoded turns
-- The caller counts tokens in every family of the catalog because it does not know the
-- session's family before the script runs; the script picks the session's.
-- Invariants: seqs stay contiguous (the list only grows at the tail, numbered from meta.last);
-- a known request_id adds nothing; every key of the session (and its user's index) gets the
-- session's TTL again, together.
if not live(KEYS[1], KEYS[6]) then
  return {'not_found'}
end
local rid = ARGV[3]
if rid ~= '' then
  local rec = redis.call('HGET', KEYS[4], rid)
  if rec then
    local first, last, fp = string.match(rec, '^(%d+):(%d+):(.*)$')
    if fp ~= ARGV[5] then
      return {'request_mismatch'}
    end
    return {'replayed', {tonumber(first), tonumber(last)}, state(KEYS[1], KEYS[2], KEYS[3])}
  end
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= last then
  return {'aborted', {last}}
end
local family = redis.call('HGET', KEYS[1], 'family')
local nf = tonumber(ARGV[7])
local tokens, fallback = nil, 0
for i = 0, nf - 1 do
  local name, count = ARGV[8 + 2 * i], ARGV[9 + 2 * i]
  if name == family then
    tokens = count
  elseif name == '*' then
    fallback = count
  end
end
tokens = tokens or fallback
local at = 8 + 2 * nf
local n = tonumber(ARGV[at])
for i = 1, n do
  redis.call('RPUSH', KEYS[2], fmt(last + i) .. ':' .. ARGV[at + i])
end
local first = last + 1
last = last + n
redis.call('HSET', KEYS[1], 'last', fmt(last), 'updated', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'raw_tokens', tokens)
if rid ~= '' then
  redis.call('HSET', KEYS[4], rid, fmt(first) .. ':' .. fmt(last) .. ':' .. ARGV[5])
  redis.call('ZADD', KEYS[5], first, rid)
  local excess = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[6])
  if excess > 0 then
    local old = redis.call('ZPOPMIN', KEYS[5], excess)
    for i = 1, #old, 2 do
      redis.call('HDEL', KEYS[4], old[i])
    end
  end
end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl'))
for i = 1, 5 do
  redis.call('PEXPIRE', KEYS[i], ttl)
end
local user = redis.call('HGET', KEYS[1], 'user')
if user and user ~= '' then
  extend(ARGV[1] .. user, ttl)
end
return {'ok', {first, last}, state(KEYS[1], KEYS[2], KEYS[3])}
