"""The Lua scripts behind the store's atomic transitions (each runs as one Redis step).

Every script that a worker runs on a job checks (status, worker, attempt) first, so a
worker the reaper gave up on never writes over the job's next attempt.
"""

# KEYS: job hash, running set. ARGV: rq id, worker, now, model json, job id.
CLAIM = """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id')
if not s[1] then return 'missing' end
if s[1] ~= 'queued' then return s[1] end
if s[2] ~= ARGV[1] then return 'stale' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3],
           'progress', '0', 'model', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
return 'ok'
"""

# A queued job taken straight from the queue into a running batch (PROMPTPIX_MAX_BATCH):
# its queue entry and RQ job go, so no other worker pops it. LREM finding nothing means
# another worker popped it first: that one claims it the usual way.
# KEYS: job hash, running set, queue list, RQ job hash. ARGV as CLAIM.
TAKE = """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id')
if not s[1] then return 'missing' end
if s[1] ~= 'queued' then return s[1] end
if s[2] ~= ARGV[1] then return 'stale' end
if redis.call('LREM', KEYS[3], 1, ARGV[1]) == 0 then return 'gone' end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3],
           'progress', '0', 'model', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
return 'ok'
"""

# KEYS: job hash, preview. ARGV: worker, attempt, progress, preview png ('' = none), ttl.
PROGRESS = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt', 'progress')
if s[1] ~= 'running' or s[2] ~= ARGV[1] or s[3] ~= ARGV[2] then return 0 end
if tonumber(ARGV[3]) > tonumber(s[4] or '0') then
  redis.call('HSET', KEYS[1], 'progress', ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  redis.call('HSET', KEYS[1], 'has_preview', '1')
end
return 1
"""

# KEYS: job hash, running set, preview, image keys... ARGV: worker, attempt, status, now,
# ttl, error code, error message, job id, pngs... (one per image key)
FINISH = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt', 'idem')
if s[1] ~= 'running' or s[2] ~= ARGV[1] or s[3] ~= ARGV[2] then return 0 end
local n = #KEYS - 3
for i = 1, n do
  redis.call('SET', KEYS[3 + i], ARGV[8 + i], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[4], 'images', tostring(n),
           'error_code', ARGV[6], 'error_message', ARGV[7])
if ARGV[3] == 'succeeded' then redis.call('HSET', KEYS[1], 'progress', '1') end
redis.call('SREM', KEYS[2], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
if s[4] and s[4] ~= '' then redis.call('EXPIRE', s[4], ARGV[5]) end
return 1
"""

# A canceled job stays readable for the result TTL from now, as a finished one does.
# KEYS: job hash, queue list, running set, preview. ARGV: now, job id, ttl.
CANCEL = """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id', 'idem')
if not s[1] then return 'missing' end
if s[1] == 'queued' then
  redis.call('LREM', KEYS[2], 0, s[2])
elseif s[1] ~= 'running' then
  return s[1]
end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[3])
if s[3] and s[3] ~= '' then redis.call('EXPIRE', s[3], ARGV[3]) end
return 'ok'
"""

# A queued attempt whose queue entry cannot run (refused, or its payload does not parse):
# it ends `failed` now rather than stay `queued` until its TTL.
# KEYS: job hash. ARGV: rq id, now, ttl, error code, error message.
FAIL_QUEUED = """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id', 'idem')
if not s[1] then return 'missing' end
if s[1] ~= 'queued' then return s[1] end
if s[2] ~= ARGV[1] then return 'stale' end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2],
           'error_code', ARGV[4], 'error_message', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if s[3] and s[3] ~= '' then redis.call('EXPIRE', s[3], ARGV[3]) end
return 'ok'
"""
