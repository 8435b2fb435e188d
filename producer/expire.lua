-- End a queued request `expired` once the time it could wait is past, with no worker needed (docs/CONTRACTS.md,
-- "Cancellation and deadlines"). Readers of a result call it (client.get), so a request for a model nobody
-- serves does not sit `queued` forever.
-- KEYS[1] the result hash. ARGV: now (unix seconds).
-- A queued request whose `expires` (its deadline, or max_queued_s after admission) has passed becomes
-- `expired`. Its entry stays in the queue until a worker reads it, which then only acknowledges it and
-- writes its reply-stream record (finish.lua). Returns the status after the call ('' if there is none).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return ''
end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires') or '')
if status == 'queued' and expires and expires <= tonumber(ARGV[1]) then
  status = 'expired'
  redis.call('HSET', KEYS[1], 'status', status, 'finish_reason', status, 'finished_at', ARGV[1],
             'error', 'not started before its deadline (or INFERQ_MAX_QUEUED_S) passed')
end
return status
