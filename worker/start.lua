-- Mark a request running, unless it already ended or was cancelled while queued (docs/CONTRACTS.md, "Cancellation and deadlines").
-- KEYS[1] the result hash. ARGV: worker name, started_at (unix seconds), result_ttl_s, model, queued_at
-- (unix seconds, from the entry id: the admission writes only the status, to stay cheap), the entry
-- ('<entry id> <lane stream>').
-- Returns the status the worker must act on: 'running' (go), 'cancelled' (a cancel is pending: end it
-- cancelled), a final status it finds ('done', 'failed', 'cancelled', 'expired': only acknowledge), or
-- 'foreign': the request was admitted with another entry, so this one (forged) must not touch it.
local stored = redis.call('HMGET', KEYS[1], 'entry', 'status', 'cancel')  -- one lookup: this runs per request
local owner, status = stored[1], stored[2]
if owner and owner ~= ARGV[6] then
  return 'foreign'
end
if FINAL[status] then
  return status
end
if stored[3] == '1' then
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[1], 'model', ARGV[4],
           'queued_at', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 'running'
