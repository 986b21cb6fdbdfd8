"""The Lua scripts behind the store's atomic transitions (each runs as one Redis step).

Every script that a worker runs on a job checks (status, worker, attempt) first, so a
worker the reaper gave up on never writes over the job's next attempt. Status names,
outcomes and key names are formatted in from `schema` (no literal of them here), so the
scripts and the Python side cannot disagree.
"""

from __future__ import annotations

from string import Template

from .schema import (
    WEBHOOK_PROGRESS_INTERVAL_S,
    Admission,
    JobStatus,
    Keys,
    Transition,
    WebhookEvent,
)

WEBHOOK_STREAM_MAXLEN = 100_000  # events kept (approximately) for `promptpix webhooks`


def _lua(source: str) -> str:
    names = {f"S_{s.name}": f"'{s.value}'" for s in JobStatus}
    names |= {f"W_{w.name}": f"'{w.value}'" for w in WebhookEvent}
    names["WEBHOOK_STREAM"] = f"'{Keys.webhook_events}'"
    names["WEBHOOK_MAXLEN"] = f"'{WEBHOOK_STREAM_MAXLEN}'"
    names["WEBHOOK_PROGRESS_S"] = repr(WEBHOOK_PROGRESS_INTERVAL_S)
    names |= {f"T_{t.name}": f"'{t.value}'" for t in Transition}
    names |= {f"A_{a.name}": f"'{a.value}'" for a in Admission}
    names["JOB_PREFIX"] = f"'{Keys.job('')}'"
    return Template(source).substitute(names)


# Leaving `queued` (claimed, taken, canceled, failed): the job no longer counts against
# MAX_QUEUE (KEYS[q]) nor its caller's cap (the zset named in its `quota` field).
_UNQUEUE = """
local function unqueue(job_key, queued_key, job_id)
  redis.call('ZREM', queued_key, job_id)
  local quota = redis.call('HGET', job_key, 'quota')
  if quota and quota ~= '' then redis.call('ZREM', quota, job_id) end
end
"""

# A transition tells the job's webhook (when it has one asking for that event) by
# appending to the webhook stream in the same step as the status change: no event is lost
# or invented by a crash between the two.
_HOOK = """
local function hook(job_key, job_id, kind, now)
  local w = redis.call('HMGET', job_key, 'webhook', 'webhook_events')
  if not w[1] or w[1] == '' then return end
  if not string.find(',' .. (w[2] or '') .. ',', ',' .. kind .. ',', 1, true) then return end
  redis.call('XADD', $WEBHOOK_STREAM, 'MAXLEN', '~', $WEBHOOK_MAXLEN, '*',
             'job', job_id, 'type', kind, 'at', now)
end
"""

# KEYS: job hash, running set, queued zset. ARGV: rq id, worker, now, model json, job id.
CLAIM = _lua(_UNQUEUE + _HOOK + """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id')
if not s[1] then return $T_MISSING end
if s[1] ~= $S_QUEUED then return s[1] end
if s[2] ~= ARGV[1] then return $T_STALE end
redis.call('HSET', KEYS[1], 'status', $S_RUNNING, 'worker', ARGV[2], 'started_at', ARGV[3],
           'progress', '0', 'model', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
unqueue(KEYS[1], KEYS[3], ARGV[5])
hook(KEYS[1], ARGV[5], $W_START, ARGV[3])
return $T_OK
""")

# A queued job taken straight from the queue into a running batch (PROMPTPIX_MAX_BATCH):
# its queue entry and RQ job go, so no other worker pops it. LREM finding nothing means
# another worker popped it first: that one claims it the usual way.
# KEYS: job hash, running set, queue list, RQ job hash, queued zset. ARGV as CLAIM.
TAKE = _lua(_UNQUEUE + _HOOK + """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id')
if not s[1] then return $T_MISSING end
if s[1] ~= $S_QUEUED then return s[1] end
if s[2] ~= ARGV[1] then return $T_STALE end
if redis.call('LREM', KEYS[3], 1, ARGV[1]) == 0 then return $T_GONE end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[1], 'status', $S_RUNNING, 'worker', ARGV[2], 'started_at', ARGV[3],
           'progress', '0', 'model', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
unqueue(KEYS[1], KEYS[5], ARGV[5])
hook(KEYS[1], ARGV[5], $W_START, ARGV[3])
return $T_OK
""")

# Progress events reach a webhook at most once per WEBHOOK_PROGRESS_S.
# KEYS: job hash, preview. ARGV: worker, attempt, progress, preview png ('' = none), ttl,
# now, job id.
PROGRESS = _lua(_HOOK + """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt', 'progress',
                     'webhook_progress_at')
if s[1] ~= $S_RUNNING or s[2] ~= ARGV[1] or s[3] ~= ARGV[2] then return 0 end
if tonumber(ARGV[3]) > tonumber(s[4] or '0') then
  redis.call('HSET', KEYS[1], 'progress', ARGV[3])
  if tonumber(ARGV[6]) - tonumber(s[5] or '0') >= $WEBHOOK_PROGRESS_S then
    redis.call('HSET', KEYS[1], 'webhook_progress_at', ARGV[6])
    hook(KEYS[1], ARGV[7], $W_PROGRESS, ARGV[6])
  end
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  redis.call('HSET', KEYS[1], 'has_preview', '1')
end
return 1
""")

# KEYS: job hash, running set, preview, image keys... ARGV: worker, attempt, status, now,
# ttl, error code, error message, job id, result json ('' = none), pngs... (one per key)
FINISH = _lua(_HOOK + """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt', 'idem')
if s[1] ~= $S_RUNNING or s[2] ~= ARGV[1] or s[3] ~= ARGV[2] then return 0 end
local n = #KEYS - 3
for i = 1, n do
  redis.call('SET', KEYS[3 + i], ARGV[9 + i], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[4], 'images', tostring(n),
           'error_code', ARGV[6], 'error_message', ARGV[7], 'result', ARGV[9])
if ARGV[3] == $S_SUCCEEDED then redis.call('HSET', KEYS[1], 'progress', '1') end
redis.call('SREM', KEYS[2], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
if s[4] and s[4] ~= '' then redis.call('EXPIRE', s[4], ARGV[5]) end
hook(KEYS[1], ARGV[8], $W_COMPLETED, ARGV[4])
return 1
""")

# A canceled job stays readable for the result TTL from now, as a finished one does.
# KEYS: job hash, queue list, running set, preview, queued zset. ARGV: now, job id, ttl.
CANCEL = _lua(_UNQUEUE + _HOOK + """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id', 'idem')
if not s[1] then return $T_MISSING end
if s[1] == $S_QUEUED then
  redis.call('LREM', KEYS[2], 0, s[2])
  unqueue(KEYS[1], KEYS[5], ARGV[2])
elseif s[1] ~= $S_RUNNING then
  return s[1]
end
redis.call('HSET', KEYS[1], 'status', $S_CANCELED, 'finished_at', ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[3])
if s[3] and s[3] ~= '' then redis.call('EXPIRE', s[3], ARGV[3]) end
hook(KEYS[1], ARGV[2], $W_COMPLETED, ARGV[1])
return $T_OK
""")

# A queued attempt whose queue entry cannot run (refused, or its payload does not parse):
# it ends `failed` now rather than stay `queued` until its TTL.
# KEYS: job hash, queued zset. ARGV: rq id, now, ttl, error code, error message, job id.
FAIL_QUEUED = _lua(_UNQUEUE + _HOOK + """
local s = redis.call('HMGET', KEYS[1], 'status', 'rq_id', 'idem')
if not s[1] then return $T_MISSING end
if s[1] ~= $S_QUEUED then return s[1] end
if s[2] ~= ARGV[1] then return $T_STALE end
redis.call('HSET', KEYS[1], 'status', $S_FAILED, 'finished_at', ARGV[2],
           'error_code', ARGV[4], 'error_message', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if s[3] and s[3] ~= '' then redis.call('EXPIRE', s[3], ARGV[3]) end
unqueue(KEYS[1], KEYS[2], ARGV[6])
hook(KEYS[1], ARGV[6], $W_COMPLETED, ARGV[2])
return $T_OK
""")

# Admission of a submission, one step: the Idempotency-Key lookup first (a retry of an
# accepted job always gets that job, whatever the queue holds now), then MAX_QUEUE and the
# caller's cap, then the job hash. The RQ entry follows in the store's next step.
# A count at its cap is checked again after dropping members that no longer wait (ended,
# started or expired without passing through a transition that removes them).
# The job joins its owner's index (newest-first listing), from which entries older than
# the result TTL are trimmed.
# Then the RQ entry's writes, recorded by RQ (`EnqueueOps.prepare_job`), are replayed: the
# entry exists exactly when the job does.
# KEYS: idem key (or the job key when there is none), job hash, queued zset, caller's zset
# (or the job key when uncapped), owner's index.
# ARGV: idem? ('1'/''), body hash, job id, now, ttl, max queue, caller cap (0 = none),
#       the job hash's fields and values, then the RQ writes: each command as its argument
#       count followed by the command and its arguments; both `rqentry.pack`ed (one
#       argument each: '<length>:<bytes>' per value).
ADMIT = _lua("""
local find, sub, tonumber = string.find, string.sub, tonumber
local function unpacked(s)
  local out, n, i, len = {}, 0, 1, #s
  while i <= len do
    local colon = find(s, ':', i, true)
    local size = tonumber(sub(s, i, colon - 1))
    n = n + 1
    out[n] = sub(s, colon + 1, colon + size)
    i = colon + size + 1
  end
  return out
end
if ARGV[1] == '1' then
  local found = redis.call('GET', KEYS[1])
  if found then
    local old_id, old_hash = string.match(found, '^([^:]*):(.*)$$')
    if old_id and redis.call('EXISTS', $JOB_PREFIX .. old_id) == 1 then
      if old_hash ~= ARGV[2] then return {$A_CONFLICT, old_id} end
      return {$A_EXISTING, old_id}
    end
  end
end
local function waiting(key, cap)
  local n = redis.call('ZCARD', key)
  if n < cap then return n end
  for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if redis.call('HGET', $JOB_PREFIX .. id, 'status') ~= $S_QUEUED then
      redis.call('ZREM', key, id)
    end
  end
  return redis.call('ZCARD', key)
end
local max_queue, cap = tonumber(ARGV[6]), tonumber(ARGV[7])
if waiting(KEYS[3], max_queue) >= max_queue then return {$A_QUEUE_FULL, ''} end
if cap > 0 and waiting(KEYS[4], cap) >= cap then return {$A_QUOTA_EXCEEDED, ''} end
redis.call('HSET', KEYS[2], unpack(unpacked(ARGV[8])))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', tonumber(ARGV[4]) - tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[5], ARGV[5])
if cap > 0 then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], ARGV[3] .. ':' .. ARGV[2], 'EX', ARGV[5])
end
local writes = unpacked(ARGV[9])
local i = 1
while i <= #writes do
  local n = tonumber(writes[i])
  redis.call(unpack(writes, i + 1, i + n))
  i = i + n + 1
end
return {$A_CREATED, ARGV[3]}
""")

# A status read in one step: the job hash and, while it waits, its attempt's position in
# its model's RQ queue (-1: not in it, e.g. just popped by a worker; or no model named).
# KEYS: job hash. ARGV: the RQ queue key prefix of generation queues (`rq:queue:generate:`).
# Returns {HGETALL's flat list, position}.
STATUS = _lua("""
local raw = redis.call('HGETALL', KEYS[1])
local f = {}
for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
local pos = -1
if f['status'] == $S_QUEUED and f['params'] then
  local ok, params = pcall(cjson.decode, f['params'])
  if ok and type(params) == 'table' and type(params['model']) == 'string'
      and params['model'] ~= '' then
    pos = redis.call('LPOS', ARGV[1] .. params['model'], f['rq_id']) or -1
  end
end
return {raw, pos}
""")
