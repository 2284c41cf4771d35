-- Adds items ("<job id> <Job protobuf>") to a batch being created.
-- ARGV: 4 batch id  5 creating (ms)  6.. items
local bkey = batch_key(ARGV[4])
if redis.call('HGET', bkey, 'state') ~= '0' then
  return {'gone'}
end
local todo = bkey .. ':todo'
for i = 6, #ARGV do
  redis.call('RPUSH', todo, ARGV[i])
end
redis.call('HINCRBY', bkey, 'total', #ARGV - 5)
redis.call('PEXPIRE', todo, ARGV[5])
return {'ok'}
