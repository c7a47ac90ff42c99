-- ARGV: now, lease id, new expiry (ms). Pushes an active lease's expiry out (a call still
-- running: its heartbeat); a lease already settled, released or expired stays as it is.
-- Returns 1 when renewed, 0 when the lease is no longer active.
local lease_id, expires = ARGV[2], tonumber(ARGV[3])
sweep()
local leases = base .. ':leases'
if redis.call('ZSCORE', leases, lease_id) == false
    or redis.call('EXISTS', base .. ':l:' .. lease_id) == 0 then
  return 0
end
redis.call('ZADD', leases, 'XX', fmt(expires), lease_id)
redis.call('PEXPIREAT', base .. ':l:' .. lease_id, fmt(expires + DONE_TTL))
expire_at_least(leases, expires + 2 * DONE_TTL)
return 1
