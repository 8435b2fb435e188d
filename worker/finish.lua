-- End a request: store its final state once, then acknowledge and delete its entry (DESIGN.md "Delivery").
-- KEYS[1] result hash, KEYS[2] lane stream, KEYS[3] the model's tenant counters,
-- KEYS[4] (optional) the request's reply stream.
-- ARGV: group, entry_id, result_ttl_s, durable record (msgpack, for the reply stream), worker name,
--       tenant ('' for none), then field, value, ... of the final state.
-- The write is idempotent: if another delivery of the same request already stored a final state, that one
-- stands (a redelivered request never yields two different results) and the extra run is only counted in
-- `duplicates`. A request cancelled while queued has a final state but no run (no `ended_by`): its one
-- reply-stream record is written here, when a worker acknowledges its entry.
-- Returns 1 if this call stored the result, 0 if one was there already.
local status = redis.call('HGET', KEYS[1], 'status')
local final = status == 'done' or status == 'failed' or status == 'cancelled' or status == 'expired'
local wrote = 0
if final and redis.call('HEXISTS', KEYS[1], 'ended_by') == 1 then
  redis.call('HINCRBY', KEYS[1], 'duplicates', 1)
else
  if not final then
    local fields = {}
    for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
    redis.call('HSET', KEYS[1], unpack(fields))
    redis.call('HDEL', KEYS[1], 'cancel')
    wrote = 1
  end
  redis.call('HSET', KEYS[1], 'ended_by', ARGV[5])
  if KEYS[4] then
    redis.call('XADD', KEYS[4], '*', 'm', ARGV[4])
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
-- The tenant's count goes down once per entry: when this call is the one that acknowledges it.
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 1 and ARGV[6] ~= '' then
  if redis.call('HINCRBY', KEYS[3], ARGV[6], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[6])
  end
end
redis.call('XDEL', KEYS[2], ARGV[2])
return wrote
