-- ARGV: now, event id, actual usage JSON {tokens, cost}, checks (JSON). Usage recorded
-- without a lease (tracked calls, fail-open catch-up); once per event id.
local event_id = ARGV[2]
local actual = cjson.decode(ARGV[3])
local checks = cjson.decode(ARGV[4])
sweep()
if redis.call('EXISTS', base .. ':d:' .. event_id) == 1 then return 0 end
for _, c in ipairs(checks) do
  state(c)
  apply(c, c.slot, charge_of(c, actual, c.fixed))
end
redis.call('SET', base .. ':d:' .. event_id, '{"state":"committed"}', 'PX', DONE_TTL)
return 1
