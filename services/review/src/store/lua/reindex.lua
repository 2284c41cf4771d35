-- When the tenant is next due for the sweeper: {'ok', Unix ms} or {'ok', ''} when nothing is.
local nxt = next_due()
if nxt then
  return {'ok', fmt(nxt)}
end
return {'ok', ''}
