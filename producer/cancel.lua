-- Cancel a request (docs/CONTRACTS.md, "Cancellation and deadlines").
-- KEYS[1] the result hash. ARGV: request id, now (unix seconds), the cancel channel (a channel, not a key:
-- an ACL grants it as one).
-- A queued request becomes `cancelled` at once (a worker skips it when it reads it); a running one gets a
-- `cancel` mark and a broadcast, and its worker aborts it in the engine. Returns the status after the call,
-- or '' if there is no such request.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return ''
end
if FINAL[status] then
  return status
end
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finish_reason', 'cancelled', 'finished_at', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return redis.call('HGET', KEYS[1], 'status')
