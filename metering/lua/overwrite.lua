-- ARGV: now, [[check, value], ...] (JSON). Counters set to values rebuilt from the ledger,
-- plus what the tag's active leases hold.
local pairs_ = cjson.decode(ARGV[2])
sweep()
local held = {}
for _, id in ipairs(redis.call('ZRANGE', base .. ':leases', 0, -1)) do
  local raw = redis.call('GET', base .. ':l:' .. id)
  if raw then
    for _, ch in ipairs(lease_charges(cjson.decode(raw))) do
      local k = ch.key .. '#' .. fmt(ch.kind == 'rolling' and ch.slot or 0)
      held[k] = (held[k] or 0) + ch.charged
    end
  end
end
local cleared = {}
for _, p in ipairs(pairs_) do
  local c = p[1]
  if c.kind ~= 'bucket' and not cleared[c.key] then
    redis.call('DEL', base .. c.key)
    cleared[c.key] = true
    -- leases on slots or periods the rebuild does not name still hold their charge
    for k, v in pairs(held) do
      local key, slot = string.match(k, '^(.*)#(-?%d+)$')
      if key == c.key then apply(c, tonumber(slot), v) ; held[k] = nil end
    end
  end
end
for _, p in ipairs(pairs_) do
  local c, value = p[1], p[2]
  if c.kind ~= 'bucket' then apply(c, c.kind == 'rolling' and c.slot or 0, value) end
end
return 1
