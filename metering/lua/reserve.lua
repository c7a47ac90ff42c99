-- ARGV: now, lease id, lease expiry (ms), wanted output tokens, least output worth granting,
-- clip (1/0), meta (JSON), checks (JSON). All or nothing across every check.
local lease_id, expires = ARGV[2], tonumber(ARGV[3])
local want, min_out, clip = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local checks = cjson.decode(ARGV[8])
sweep()
if redis.call('EXISTS', base .. ':l:' .. lease_id, base .. ':d:' .. lease_id) > 0 then
  return redis.error_reply('lease id ' .. lease_id .. ' was already used')
end
local grant, binding = want, -1
local states = {}
for i, c in ipairs(checks) do
  local st = state(c)
  states[i] = st
  local cap_out
  if c.per_out > 0 then
    cap_out = math.floor((st[2] - c.fixed) / c.per_out)
  elseif st[2] >= c.fixed then
    cap_out = want
  else
    cap_out = -1
  end
  if cap_out < grant then grant, binding = cap_out, i - 1 end
end
if grant < min_out or (not clip and grant < want) then
  local replies = {}
  for i, st in ipairs(states) do replies[i] = reply_state(st) end
  return cjson.encode({granted = false, refused = binding, states = replies})
end
local charged = {}
for i, c in ipairs(checks) do
  local charge = c.fixed + c.per_out * grant
  apply(c, c.slot, charge)
  charged[i] = fmt(charge)
  local st = states[i]
  if st[3] == nil and charge > 0 and c.kind == 'rolling' then st[3] = c.slot end
  states[i] = reply_state({st[1] + charge, st[2] - charge, st[3]})
end
redis.call('SET', base .. ':l:' .. lease_id, lease_json(ARGV[8], charged, ARGV[7]),
           'PXAT', fmt(expires + DONE_TTL))
redis.call('ZADD', base .. ':leases', fmt(expires), lease_id)
-- the lease index outlives its leases; pushed two lifetimes ahead so that most calls skip it
local ttl = redis.call('PTTL', base .. ':leases')
if ttl < 0 or now + ttl < expires + DONE_TTL then
  redis.call('PEXPIREAT', base .. ':leases', fmt(expires + 2 * DONE_TTL))
end
return cjson.encode({granted = true, out = fmt(grant), states = states})
