-- Atomic admission (docs/CONTRACTS.md, "Admission and backpressure"): refuse at the caps, else enqueue. Never trims.
-- One call admits a batch of requests for one lane, in order, each checked against the caps as they stand
-- after the ones before it (one script call per batch: the Lua call overhead is paid once).
-- KEYS[1] lane stream, KEYS[2] the model's tenant counters (hash tenant -> unfinished requests),
-- KEYS[3] the model's refusal counters (hash `LANE:REASON` -> refusals, for the workers' metrics),
-- KEYS[4 .. 3+n] the requests' result hashes, then with mode 'retry' (n = 1) the DLQ, with mode 'bulk' the
-- id hash of the bulk job whose lines these are.
-- ARGV: max_queue_len (this lane), max_lag (0: off), group, tenant_cap (0: off), n,
--       tenant ('' for none; one per call), then the n payloads, then the n results' TTLs (seconds), then
--       the n wait limits (unix seconds: past it, the request is not started but ends `expired`), then
--       the mode ('' | 'retry' | 'bulk'), then for 'retry' the DLQ entry id, for 'bulk' the n lines'
--       references, '<custom_id digest> <epoch>' (keys.py, bulk_line).
-- Returns per request {code, queue_len, lag, entry_id, tenant_count}:
--   code 1 admitted, 0 refused (lane at its cap or lag cap), 3 refused (the tenant is at its cap),
--   2 the id exists already (idempotent: nothing added); for a retry: the letter is gone or the request has
--   a result other than `failed` (it was retried already, or finished after all).
-- A retry replaces the failed result and removes the dead letter in the same step. The tenant counter
-- goes up here and down when a worker acknowledges the entry (worker/finish.lua).
-- A bulk line its runner fed (its digest in the job's id hash, with its first line number) gets no result
-- hash: the id hash field becomes '<line> <epoch> <entry id> <lane stream>' (`admitted_entry`), half the
-- bytes of a result hash with its key and TTL. A worker writes the result hash when it starts the line.
local stream, tenants, refusals = KEYS[1], KEYS[2], KEYS[3]
local max_len, max_lag, group = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local tenant_cap, n, tenant = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local mode = ARGV[7 + 3 * n]
local dlq = mode == 'retry' and KEYS[4 + n] or nil
local ids = mode == 'bulk' and KEYS[4 + n] or nil
local lane = string.match(stream, ':([^:]+):{[^}]*}$')  -- keys.py ends a lane stream's name with its lane and tag

local qlen = redis.call('XLEN', stream)
if qlen == 0 and redis.call('EXISTS', stream) == 0 then
  -- First add: create the group from 0 so entries added before any worker started are read.
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
end
local lag = 0
if max_lag > 0 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      -- lag is nil after an entry the group never read was deleted; fall back to XLEN - pending
      if type(info['lag']) == 'number' then lag = info['lag'] else lag = qlen - info['pending'] end
    end
  end
end

local out = {}
for i = 1, n do
  local result = KEYS[3 + i]
  local code, owned, entry_id = nil, 0, ''
  -- A fed bulk line: its first line number alone ('<line>'), or with its entry while it is queued.
  local digest, epoch
  if ids then
    digest, epoch = string.match(ARGV[7 + 3 * n + i], '^(%S+) (%d+)$')
  end
  local line = digest and redis.call('HGET', ids, digest) or nil
  local fed = line and string.match(line, '^%d+$')
  local function known()
    return redis.call('EXISTS', result) == 1 or (line and not fed)
  end
  if dlq then  -- a retry: only of a letter still there, for a request whose stored result is `failed`
    local stored = redis.call('HGET', result, 'status')
    if (stored and stored ~= 'failed') or #redis.call('XRANGE', dlq, ARGV[8 + 3 * n], ARGV[8 + 3 * n]) == 0 then
      code = 2
    end
  end
  -- Refusals look up the id (an id that is queued already answers "exists", not "full").
  if not code and (qlen >= max_len or (max_lag > 0 and lag >= max_lag)) then
    code = (not dlq and known()) and 2 or 0
  end
  if not code and tenant ~= '' then
    owned = tonumber(redis.call('HGET', tenants, tenant) or '0')
    if tenant_cap > 0 and owned >= tenant_cap then
      code = (not dlq and known()) and 2 or 3
    end
  end
  if not code then
    if dlq then
      redis.call('DEL', result)
      redis.call('XDEL', dlq, ARGV[8 + 3 * n])
    end
    -- start.lua records model and queued_at (from the entry id). The result names the entry that owns it
    -- (`entry`: id and stream), so a forged entry with the same request id can neither run nor end it, and
    -- the time past which it is not started (`expires`: its deadline, or max_queued_s after now), so a
    -- reader can end it `expired` with no worker (expire.lua). Its TTL outlives that by result_ttl_s.
    if known() then
      code = 2
    else
      if tenant ~= '' then
        redis.call('HINCRBY', tenants, tenant, 1)
        owned = owned + 1
      end
      entry_id = redis.call('XADD', stream, '*', 'm', ARGV[6 + i])
      local entry = entry_id .. ' ' .. stream
      if fed then
        local mark = line .. ' ' .. epoch .. ' ' .. entry  -- a value, not a key name
        redis.call('HSET', ids, digest, mark)
      else
        redis.call('HSET', result, 'status', 'queued', 'entry', entry, 'expires', ARGV[6 + 2 * n + i])
        redis.call('EXPIRE', result, ARGV[6 + n + i])
      end
      qlen = qlen + 1
      if max_lag > 0 then lag = lag + 1 end
      code = 1
    end
  end
  if code == 0 or code == 3 then
    local reason = (code == 3 and 'tenant_cap') or (qlen >= max_len and 'queue_full') or 'lag_cap'
    local field = lane .. ':' .. reason
    redis.call('HINCRBY', refusals, field, 1)
  end
  out[i] = {code, qlen, lag, entry_id, owned}
end
return out
