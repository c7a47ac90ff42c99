-- ARGV: now, checks (JSON). Each check's state, after releasing expired leases.
local checks = cjson.decode(ARGV[2])
sweep()
local states = {}
for i, c in ipairs(checks) do states[i] = reply_state(state(c)) end
return cjson.encode({states = states})
