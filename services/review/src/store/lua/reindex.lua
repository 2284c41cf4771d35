-- Recomputes when the tenant is next due for the sweeper.
reindex()
return {'ok'}
