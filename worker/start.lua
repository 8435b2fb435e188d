-- Mark a request running, unless it already ended or was cancelled while queued (docs/CONTRACTS.md, "Cancellation and deadlines").
-- KEYS[1] the result hash, KEYS[2] (a bulk job's line only) the job's id hash. ARGV: worker name, started_at
-- (unix seconds), result_ttl_s, model, queued_at (unix seconds, from the entry id: the admission writes only
-- the status, to stay cheap), the entry ('<entry id> <lane stream>'), [the line's reference].
-- A bulk line its runner admitted has no result hash yet: the entry that owns it is in the id hash, and goes
-- into the result hash written here (finish.lua and cancel.lua find it there); the id hash lets go of it.
-- Returns the status the worker must act on: {'running', attempts} (go: the starts counted, this one included,
-- which the worker sends with the final event), 'cancelled' (a cancel is pending: end it cancelled), a final
-- status it finds ('done', 'failed', 'cancelled', 'expired': only acknowledge), or 'foreign': the request was
-- admitted with another entry, so this one (forged) must not touch it.
local stored = redis.call('HMGET', KEYS[1], 'entry', 'status', 'cancel', 'attempts')  -- one lookup: runs per request
local owner, status = stored[1], stored[2]
local marked, line
if not owner then
  marked, line = admitted_entry(KEYS[2], ARGV[7])
end
if (owner or marked) and (owner or marked) ~= ARGV[6] then
  return 'foreign'
end
if FINAL[status] then
  return status
end
if stored[3] == '1' then
  return 'cancelled'
end
local attempts = (tonumber(stored[4]) or 0) + 1  -- counted in the same write (one command less a request)
local fields = {'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[1], 'model', ARGV[4], 'queued_at', ARGV[5],
  'attempts', attempts}
if marked then
  fields[#fields + 1], fields[#fields + 2] = 'entry', marked
end
redis.call('HSET', KEYS[1], unpack(fields))
if marked then
  settle_line(KEYS[2], ARGV[7], line)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {'running', attempts}
