-- ARGV: now, lease id, actual usage as JSON {tokens, cost}, or "" to release, and how long
-- to remember the answer for a repeat (ms; 0: not at all).
local lease_id = ARGV[2]
local remember = tonumber(ARGV[4])
sweep()
local done = redis.call('GET', base .. ':d:' .. lease_id)
if done then
  local doc = cjson.decode(done)
  local outcome = doc.state
  if outcome ~= 'expired' then outcome = 'already_' .. outcome end
  return cjson.encode({outcome = outcome, actual = doc.actual})
end
local raw = redis.call('GET', base .. ':l:' .. lease_id)
if not raw then return cjson.encode({outcome = 'unknown'}) end
local lease = cjson.decode(raw)
local actual = nil
if ARGV[3] ~= '' then actual = cjson.decode(ARGV[3]) end
for _, ch in ipairs(lease_charges(lease)) do
  local real = 0
  if actual then real = charge_of(ch, actual, ch.charged) end
  apply(ch, ch.slot, real - ch.charged)
end
local outcome = 'released'
if actual then outcome = 'settled' end
redis.call('DEL', base .. ':l:' .. lease_id)
redis.call('ZREM', base .. ':leases', lease_id)
if remember > 0 then
  redis.call('SET', base .. ':d:' .. lease_id,
             cjson.encode({state = outcome, meta = lease.meta, actual = actual}), 'PX', remember)
end
return cjson.encode({outcome = outcome, actual = actual})
