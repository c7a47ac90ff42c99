-- Shared by every limits script (prepended by meterlane/metering/redislimits.py).
-- KEYS[1] is the tag's base key "ml:{tag}": every key a script touches starts with it, so all
-- of them hash to one slot and the scripts run on Redis Cluster. ARGV[1] is now in ms.
-- The same steps, in Python, are meterlane/metering/limitstore.py (the SQL store).
local base = KEYS[1]
local now = tonumber(ARGV[1])
local DONE_TTL = 3600000  -- as limitstore.DONE_TTL_MS
local SWEEP_BATCH = 100

-- cjson prints numbers with 14 significant digits: anything a script encodes as JSON (a
-- reply, a done record) carries its numbers as decimal strings instead. A lease keeps the
-- checks exactly as the caller sent them (ARGV, never re-encoded) and the charges formatted
-- by fmt.
local function fmt(n) return string.format('%.0f', n) end

-- A stored lease: {"checks": [...], "charged": [...], "meta": {...}}, spliced from the
-- reserve's own arguments (no decode and encode of what it only keeps).
local function lease_json(checks_json, charged, meta_json)
  return '{"checks":' .. checks_json .. ',"charged":[' .. table.concat(charged, ',') ..
         '],"meta":' .. meta_json .. '}'
end

-- A lease's checks, each with what it was charged.
local function lease_charges(lease)
  if lease.checks == nil then
    -- written by an earlier version: {"charges": [check with charged, numbers as strings]}
    for _, ch in ipairs(lease.charges) do
      for k, v in pairs(ch) do
        if k ~= 'key' and k ~= 'kind' and k ~= 'metric' then ch[k] = tonumber(v) end
      end
    end
    return lease.charges
  end
  for i, ch in ipairs(lease.checks) do ch.charged = lease.charged[i] end
  return lease.checks
end

local function reply_state(st)
  return {fmt(st[1]), fmt(st[2]), st[3] and fmt(st[3]) or false}
end

local function expire_at_least(key, at)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 or now + ttl < at then redis.call('PEXPIREAT', key, fmt(at)) end
end

local function bucket_level(c)
  local cap = c.amount * c.interval_ms
  local h = redis.call('HMGET', base .. c.key, 'l', 'ts')
  if not h[1] then return cap end
  local level, ts = tonumber(h[1]), tonumber(h[2])
  if now > ts then level = math.min(cap, level + (now - ts) * c.refill) end
  return level
end

-- used, remaining, oldest slot holding usage (rolling)
local function state(c)
  local key = base .. c.key
  if c.kind == 'counter' or c.kind == 'gauge' then
    local used = tonumber(redis.call('GET', key) or '0')
    return {used, c.amount - used}
  elseif c.kind == 'rolling' then
    local low = c.slot - c.slots + 1
    local used, oldest = 0, nil
    local h = redis.call('HGETALL', key)
    for i = 1, #h, 2 do
      local slot, v = tonumber(h[i]), tonumber(h[i + 1])
      if slot < low then
        redis.call('HDEL', key, h[i])
      else
        used = used + v
        if v > 0 and (oldest == nil or slot < oldest) then oldest = slot end
      end
    end
    return {used, c.amount - used, oldest}
  end
  local tokens = math.floor(bucket_level(c) / c.interval_ms)
  return {c.amount - tokens, tokens}
end

local function apply(c, slot, delta)
  if delta == 0 then return end
  local key = base .. c.key
  if c.kind == 'counter' or c.kind == 'gauge' then
    if delta < 0 and redis.call('EXISTS', key) == 0 then return end
    local value = redis.call('INCRBY', key, fmt(delta))
    if c.kind == 'gauge' and value <= 0 then
      redis.call('DEL', key)
    elseif c.expires_ms > 0 and value == delta then
      redis.call('PEXPIREAT', key, fmt(c.expires_ms))  -- a new counter (its period's first use)
    end
  elseif c.kind == 'rolling' then
    local field = fmt(slot)
    if delta < 0 and redis.call('HEXISTS', key, field) == 0 then return end
    redis.call('HINCRBY', key, field, fmt(delta))
    local expires = (slot + c.slots + 1) * c.slot_ms
    expire_at_least(key, expires)
  else
    local cap = c.amount * c.interval_ms
    local level = math.min(cap, bucket_level(c) - delta * c.interval_ms)
    if level >= cap then
      redis.call('DEL', key)
    else
      redis.call('HSET', key, 'l', fmt(level), 'ts', fmt(now))
      redis.call('PEXPIREAT', key, fmt(now + math.floor((cap - level) / c.refill) + 1))
    end
  end
end

-- Release every lease of this tag that is past its expiry.
local function sweep()
  local leases = base .. ':leases'
  local ids = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, SWEEP_BATCH)
  for _, id in ipairs(ids) do
    local raw = redis.call('GET', base .. ':l:' .. id)
    if raw then
      local lease = cjson.decode(raw)
      for _, ch in ipairs(lease_charges(lease)) do apply(ch, ch.slot, -ch.charged) end
      redis.call('DEL', base .. ':l:' .. id)
      redis.call('SET', base .. ':d:' .. id, cjson.encode({state = 'expired', meta = lease.meta}),
                 'PX', DONE_TTL)
    end
    redis.call('ZREM', leases, id)
  end
end

-- What a check is charged for a call that really used `actual` ({tokens, cost}); `ran` is
-- what a request counts (its reservation, or 1 for a tracked call).
local function charge_of(ch, actual, ran)
  if ch.metric == 't' then return tonumber(actual.tokens) end
  if ch.metric == 'w' then return tonumber(actual.credits or actual.tokens) end
  if ch.metric == 'c' then return tonumber(actual.cost) end
  if ch.metric == 'r' then return ran end
  return 0
end
