-- Atomic admission (DESIGN.md "Admission / backpressure"): refuse at the caps, else enqueue. Never trims.
-- KEYS[1] lane stream, KEYS[2] result hash, KEYS[3] the model's tenant counters (hash tenant -> unfinished),
-- KEYS[4] (only to retry a dead letter) the DLQ stream
-- ARGV: max_queue_len (this lane), max_lag (0: off), group, payload, model, queued_at, result_ttl_s,
--       tenant ('' for none), tenant_cap (0: off), [DLQ entry id]
-- Returns {code, queue_len, lag, entry_id, tenant_count}:
--   code 1 admitted, 0 refused (lane at its cap or lag cap), 3 refused (the tenant is at its cap),
--   2 the id exists already (idempotent: nothing added).
-- A retry (KEYS[4] given) replaces the failed result and removes the dead letter in the same step.
-- The tenant counter goes up here and down when a worker acknowledges the entry (worker/finish.lua).
local max_len = tonumber(ARGV[1])
local max_lag = tonumber(ARGV[2])
local tenant = ARGV[8]
local tenant_cap = tonumber(ARGV[9])
local retry = KEYS[4] ~= nil

if not retry and redis.call('EXISTS', KEYS[2]) == 1 then
  return {2, 0, 0, '', 0}
end

local qlen = redis.call('XLEN', KEYS[1])
local lag = 0
local has_group = false
if qlen > 0 or redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[3] then
      has_group = true
      -- lag is nil after an entry the group never read was deleted; fall back to XLEN - pending
      if type(info['lag']) == 'number' then lag = info['lag'] else lag = qlen - info['pending'] end
    end
  end
end

if qlen >= max_len or (max_lag > 0 and lag >= max_lag) then
  return {0, qlen, lag, '', 0}
end

local owned = 0
if tenant ~= '' then
  owned = tonumber(redis.call('HGET', KEYS[3], tenant) or '0')
  if tenant_cap > 0 and owned >= tenant_cap then
    return {3, qlen, lag, '', owned}
  end
  redis.call('HINCRBY', KEYS[3], tenant, 1)
  owned = owned + 1
end

-- The group reads from 0, so entries added before any worker started are not missed.
if not has_group then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
end
if retry then
  redis.call('DEL', KEYS[2])
  redis.call('XDEL', KEYS[4], ARGV[10])
end
local entry_id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[4])
redis.call('HSET', KEYS[2], 'status', 'queued', 'model', ARGV[5], 'queued_at', ARGV[6], 'attempts', 0)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
return {1, qlen + 1, lag + 1, entry_id, owned}
