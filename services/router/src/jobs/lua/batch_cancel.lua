-- Cancels a batch: CANCELLING, its queued and todo items end (a chunk now, the rest by the
-- janitor), its running items may finish; CANCELLED once every item has ended. An ended batch is
-- returned unchanged.
-- ARGV: 4 batch id  5 retention (ms)  6 close chunk
local bid = ARGV[4]
local bkey = batch_key(bid)
local b = hash(bkey)
if not b or b.state == '0' then
  return {'not_found'}
end
if not batch_terminal(b.state) and (b.ending or '') == '' then
  redis.call('HSET', bkey, 'state', '3', 'ending', 'cancelled')
  publish(bid)
  close(bid, 'cancelled', tonumber(ARGV[6]), ARGV[5])
end
return batch_done(bid)
