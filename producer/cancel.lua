-- Cancel a request (docs/CONTRACTS.md, "Cancellation and deadlines").
-- KEYS[1] the result hash, KEYS[2] (a bulk job's line only) the job's id hash. ARGV: request id, now (unix
-- seconds), the cancel channel (a channel, not a key: an ACL grants it as one), [the line's reference, the
-- result's TTL (seconds)].
-- A queued request becomes `cancelled` at once (a worker skips it when it reads it); a running one gets a
-- `cancel` mark and a broadcast, and its worker aborts it in the engine. Returns the status after the call,
-- or '' if there is no such request.
-- A bulk line queued by its runner has no result hash yet (its entry is in the id hash: admit.lua): it gets
-- one here, `cancelled` and naming its entry, so the worker that reads the entry only acknowledges it.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  local marked, line = admitted_entry(KEYS[2], ARGV[4])
  if not marked then
    return ''
  end
  redis.call('HSET', KEYS[1], 'entry', marked, 'status', 'queued')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  settle_line(KEYS[2], ARGV[4], line)
  status = 'queued'
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
