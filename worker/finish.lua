-- End a request: store its final state once, then acknowledge and delete its entry (docs/CONTRACTS.md, "Delivery").
-- KEYS[1] result hash, KEYS[2] lane stream, KEYS[3] the model's tenant counters, KEYS[4] the model's DLQ,
-- KEYS[5] the model's count of dead letters dropped, KEYS[6] (optional) the request's reply stream, and last
-- (a bulk job's line only) the job's id hash.
-- ARGV[1] group, [2] entry id, [3] result_ttl_s, [4] the reply-stream record of this run (msgpack),
-- [5] worker name, [6] tenant ('' for none), [7] the reply-stream record of a request cancelled while queued
-- (msgpack; '' without a reply stream), [8] the DLQ's length bound, [9] n = how many result field/value
-- items follow, [10] the bulk line's reference ('' for another request), [11] the request's reply channel ('' for
-- none), [12] its final event carrying the stored result ('' for none: a streamed request, or one that did not
-- start in this run), [13] the `started_at` of this run's start ('' for none), [14] its final event without the
-- result (each event one TokenEvent map, packed), [15] '1' if this call is the run's start too ('' if not),
-- [16 .. 15+n] the final state's fields and values, then (to dead-letter the entry) the DLQ entry's fields and
-- values.
-- A start that had not gone out when the run ended is made here (worker/consumer.py, "started with its first
-- write"): the start's fields are among the final state's, and the attempt is counted here as start.lua counts
-- it. A request that ended or was cancelled while queued keeps its state, as with start.lua.
-- A bulk line that never started has no result hash: the entry that owns it is in the job's id hash, which
-- lets go of it once its final state is stored.
-- The worker builds both records (worker/requests.py): this script only picks the one that is true.
-- Idempotent: if another delivery of the same request already stored a final state, that one stands (a
-- redelivered request never yields two different results, and is dead-lettered at most once); the extra
-- run is only counted in `duplicates`. A request cancelled or expired while queued has a final state but no
-- run (no `ended_by`): its one reply-stream record is written here, when a worker acknowledges its entry.
-- The final event goes out last, once all of it (and all that the calls merged with it write) is written. It
-- carries the stored result (so its client needs no read of its own) only if this call stored it and the start
-- fields stored are this run's (another worker may have taken the request over and started it again since):
-- else the client reads what is stored.
-- Returns {1} if this call stored the result, {0} if one was there already, {2} if the entry is not the one the
-- request was admitted with (forged: only the entry itself is acknowledged, deleted and dead-lettered); a
-- second element, Redis's refusal of the final event (NOPERM on the channel), when that was refused.
local n = tonumber(ARGV[9])
local ids = ARGV[10] ~= '' and KEYS[#KEYS] or nil
local reply_stream = #KEYS - (ids and 1 or 0) >= 6 and KEYS[6] or nil
local function dead_letter()
  if #ARGV > 15 + n then
    local dead = {}
    for i = 16 + n, #ARGV do dead[#dead + 1] = ARGV[i] end
    add_dead_letter(KEYS[4], KEYS[5], ARGV[8], dead)
  end
end
local function reply(record)
  if reply_stream then
    redis.call('XADD', reply_stream, '*', 'm', record)
    -- The job's runner renews its stream's TTL as it goes; a stream made anew here (its job expired) gets one.
    if redis.call('TTL', reply_stream) == -1 then
      redis.call('EXPIRE', reply_stream, tonumber(ARGV[3]))
    end
  end
end
local entry = ARGV[2] .. ' ' .. KEYS[2]
-- One lookup: this runs per request.
local stored = redis.call('HMGET', KEYS[1], 'entry', 'status', 'cancel', 'worker', 'started_at', 'attempts')
local starting = ARGV[15] == '1'
local owner, line = stored[1], nil
if not owner then
  owner, line = admitted_entry(ids, ARGV[10])
end
if owner and owner ~= entry then
  -- A forged entry that names a request admitted with another entry: it ends nothing but itself.
  dead_letter()
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  return {2}
end
local status = stored[2]
local final = FINAL[status]
local wrote = 0
-- The reply-stream record goes first: if Redis refuses it (a key of the wrong type), nothing is written.
if not final then
  reply(ARGV[4])
  local fields = {'ended_by', ARGV[5]}
  if line then  -- a bulk line ended unstarted: its result names its entry, as a started one's does
    fields[#fields + 1], fields[#fields + 2] = 'entry', owner
  end
  for i = 16, 15 + n do fields[#fields + 1] = ARGV[i] end
  if starting then
    fields[#fields + 1], fields[#fields + 2] = 'attempts', (tonumber(stored[6]) or 0) + 1
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  if stored[3] then
    redis.call('HDEL', KEYS[1], 'cancel')
  end
  dead_letter()
  wrote = 1
elseif redis.call('HEXISTS', KEYS[1], 'ended_by') == 0 then
  -- Ended while queued, by a cancel (cancel.lua) or a reader past its wait limit (expire.lua): its one
  -- reply-stream record is written now. A cancelled one's record is ARGV[7] (this run's may say 'expired':
  -- the entry was read past its deadline); the stored state stands.
  reply(status == 'cancelled' and ARGV[7] or ARGV[4])
  redis.call('HSET', KEYS[1], 'ended_by', ARGV[5])
else
  redis.call('HINCRBY', KEYS[1], 'duplicates', 1)
end
if line then
  settle_line(ids, ARGV[10], line)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
-- The tenant's count goes down once per admitted entry: when this call is the one that acknowledges it.
-- An entry the admission never made (no `entry` on its result) never counted.
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 1 and ARGV[6] ~= '' and owner then
  if redis.call('HINCRBY', KEYS[3], ARGV[6], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[6])
  end
end
redis.call('XDEL', KEYS[2], ARGV[2])
if ARGV[11] ~= '' then
  -- This run's start is what is stored: made by this call (no run started it before: its attempt is the first,
  -- as the event says), or by start.lua with this run's worker and started_at.
  local ours = starting and not stored[4] or (not starting and stored[4] == ARGV[5] and stored[5] == ARGV[13])
  local told = wrote == 1 and ARGV[12] ~= '' and ours
  -- Sent once every call of this EVALSHA has run (shared/lua.py). Refused, only the event is lost (all of it
  -- is written), and the client reads the store.
  announce(ARGV[11], told and ARGV[12] or ARGV[14])
end
return {wrote}
