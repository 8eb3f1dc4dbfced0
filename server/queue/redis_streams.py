"""The production job queue: Redis Streams with one consumer group of workers.

Layout (key names in :mod:`server.keys`):

* ``jobs`` stream: one entry per job carrying only ``job_id``; params live in
  the job hash as JSON and large inputs in their own keys, never inline.
  Workers read it through the consumer group (``XREADGROUP``), acknowledge
  after the outcome is stored (``XACK``) and take over entries idle on a
  silent worker (``XPENDING`` + ``XCLAIM``, which also tell whose they were).
* An acknowledged entry is also deleted (``XDEL``), so the stream holds exactly
  the unfinished jobs and **queue depth is ``XLEN``**: not yet delivered plus
  pending on a worker. (``XINFO GROUPS`` lag+pending was the alternative; it
  needs the group to exist and its lag becomes unknown after deletions.)
* ``job:{id}`` hash: status, params, progress, timestamps, worker, deliveries.
  Every status change is one Lua script that checks the current status and
  writes the hash, the event and the result keys together, so concurrent
  transitions (a cancel racing a completion, a duplicate completion after a
  redelivery) cannot interleave: the first terminal transition wins.
* Claims are fair across callers (``owner_set``): a fresh delivery whose caller has more jobs out on
  workers than a caller waiting behind it gives its turn, its entry moving to the tail (``_TURN_LUA``).
* Delivery counting uses the hash's ``deliveries`` field, incremented once per
  delivery by the same script that decides whether the delivery may run; it
  is visible in the job record, and a release does not count.
* Graceful release moves the entry (``XCLAIM ... IDLE <30 days> JUSTID``) to
  the well-known consumer ``released``: it keeps its place in the stream and
  is taken over by the very next ``claim`` of any worker, because it looks
  idle for longer than ``claim_timeout_s``. A ``released`` flag in the hash
  keeps that take-over from counting as a delivery or a reclaim.

Redis restarts: the client reconnects by itself (one immediate retry per
command covers a pooled connection that died); connection errors surface as
:class:`QueueUnavailable`; a missing consumer group (``NOGROUP`` after an
empty restart) is recreated on first use; scripts are reloaded by redis-py.
Redis error replies (``READONLY``, ``MISCONF``, ``OOM``...) are
:class:`QueueUnavailable` too. Memory: run Redis with ``maxmemory`` and
``maxmemory-policy noeviction`` (evicting would lose queued jobs, so the processes
warn at start under any other policy; a full Redis answers ``OOM``, i.e. 503); the submit script keeps uploads within
``max_input_bytes`` and each caller within ``max_unfinished_per_owner``, and
everything an unfinished job stores expires after ``max_job_age_s``.
Requires Redis >= 7.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ediffi.failure import Failure, FailureKind
from server.keys import DEFAULT_PREFIX, RedisKeys
from server.queue.base import (
    ClaimedJob,
    EventType,
    JobEvent,
    JobProgress,
    JobQueue,
    JobRecord,
    JobStatus,
    QueueCounters,
    QueueFull,
    QueueUnavailable,
    failed_event_data,
    parse_event_id,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# Idle time given to a released entry: far above any claim timeout, far below
# "now" in epoch milliseconds (Redis clamps a delivery time in the future to now).
_RELEASED_IDLE_MS = 30 * 24 * 3600 * 1000
_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
#: Owner of the jobs submitted without an API key (keys off): they share one cap.
ANONYMOUS_OWNER = "-anonymous-"
# Submit script verdicts for a limit reached -> QueueFull.limit
_FULL_LIMITS = {"full": "queue", "owner_full": "key", "inputs_full": "inputs", "results_full": "results"}

# Enqueue a job atomically: idempotency check, limits, inputs, hash, stream entry, first event.
# Checking and then setting the idempotency key inside one script is the SET NX
# of the design with the limit checks and the enqueue folded in, so a rejected
# submission leaves nothing behind and two submissions under one key create one job.
# Limits: queue depth (XLEN), the caller's unfinished jobs (its owner set), and the
# bytes of inputs unfinished jobs hold. Everything an unfinished job stores expires
# with its age limit (ARGV[4]); a job that reaches it unfinished gives its budget
# back the next time anybody submits (the sweep over the deadlines set).
_SUBMIT_LUA = """#!lua
-- The shebang (no allow-oom flag) makes Redis refuse the whole script while over maxmemory;
-- without it Redis checks memory only before a script's first write, and this one writes first.
-- KEYS[1] jobs stream, KEYS[2] job hash, KEYS[3] job events, KEYS[4] idempotency key,
-- KEYS[5] input bytes total, KEYS[6] input bytes by job (hash), KEYS[7] input deadlines (zset),
-- KEYS[8] owner's unfinished jobs (zset), KEYS[9] result bytes total, KEYS[10] result bytes by job (hash),
-- KEYS[11] result deadlines (zset), KEYS[12 .. 11+n] input keys
-- ARGV[1] job id, ARGV[2] max_queue, ARGV[3] "1": use the idempotency key, ARGV[4] age limit ms,
-- ARGV[5] queued event data, ARGV[6] max input bytes, ARGV[7] max unfinished per owner,
-- ARGV[8] max result bytes, ARGV[9] n inputs, ARGV[10 .. 9+n] input bytes, then hash field/value pairs
if ARGV[3] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'existing', existing} end
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local age_ms = tonumber(ARGV[4])
-- A byte budget (total, bytes by job, deadlines) gives back what reached its deadline.
local function give_back_expired(total, by_job, deadlines)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now_ms, 'LIMIT', 0, 1000)) do
    local held = redis.call('HGET', by_job, gone)
    if held then redis.call('DECRBY', total, held) end
    redis.call('HDEL', by_job, gone)
    redis.call('ZREM', deadlines, gone)
  end
end
give_back_expired(KEYS[5], KEYS[6], KEYS[7])
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now_ms)
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth), ARGV[2]} end
local owned = redis.call('ZCARD', KEYS[8])
if owned >= tonumber(ARGV[7]) then return {'owner_full', tostring(owned), ARGV[7]} end
give_back_expired(KEYS[9], KEYS[10], KEYS[11])
local results = tonumber(redis.call('GET', KEYS[9]) or '0')
if results > tonumber(ARGV[8]) then
  local first = redis.call('ZRANGE', KEYS[11], 0, 0, 'WITHSCORES')
  local wait_ms = first[2] and (tonumber(first[2]) - now_ms) or 1000
  return {'results_full', tostring(results), ARGV[8], tostring(wait_ms)}
end
local n = tonumber(ARGV[9])
local bytes = 0
for i = 1, n do bytes = bytes + string.len(ARGV[9 + i]) end
local held = tonumber(redis.call('GET', KEYS[5]) or '0')
if bytes > 0 and held + bytes > tonumber(ARGV[6]) then
  return {'inputs_full', tostring(held), ARGV[6]}
end
local deadline = now_ms + age_ms
for i = 1, n do redis.call('SET', KEYS[11 + i], ARGV[9 + i], 'PX', age_ms) end
redis.call('HSET', KEYS[2], unpack(ARGV, 10 + n, #ARGV))
local message_id = redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[1])
redis.call('HSET', KEYS[2], 'message_id', message_id, 'owner_set', KEYS[8], 'input_bytes', bytes)
redis.call('PEXPIRE', KEYS[2], age_ms)
redis.call('XADD', KEYS[3], '*', 'type', 'queued', 'data', ARGV[5])
redis.call('PEXPIRE', KEYS[3], age_ms)
if bytes > 0 then
  redis.call('INCRBY', KEYS[5], bytes)
  redis.call('HSET', KEYS[6], ARGV[1], bytes)
  redis.call('ZADD', KEYS[7], deadline, ARGV[1])
end
redis.call('ZADD', KEYS[8], deadline, ARGV[1])
redis.call('PEXPIRE', KEYS[8], age_ms)
if ARGV[3] == '1' then redis.call('SET', KEYS[4], ARGV[1], 'PX', age_ms) end
return {'created', message_id}
"""

# Change a job's status if it is in one of the allowed states; write everything that goes with it.
_TRANSITION_LUA = """
-- KEYS[1] job hash, KEYS[2] job events, KEYS[3] input bytes total, KEYS[4] input bytes by job,
-- KEYS[5] input deadlines, KEYS[6] result bytes total, KEYS[7] result bytes by job, KEYS[8] result
-- deadlines, then n_set keys to SET (the result images), then n_delete keys to DEL
-- ARGV[1] allowed current statuses, space separated and padded (" queued running ")
-- ARGV[2] ttl ms for the hash, the events and the set keys ("0": leave TTLs alone); a
--   terminal transition (ttl > 0) also gives back the job's input budget and owner slot, and
--   counts the images it stores against the result budget until they expire
-- ARGV[3] event type ("" for none), ARGV[4] event data JSON; events are trimmed to about
--   10000 per job, far above steps * stages
-- ARGV[5] n_set, ARGV[6] n_delete, ARGV[7 .. 6+n_set] values of the set keys,
-- then hash field/value pairs
-- Returns false for an unknown job, else {applied 0|1, previous status, idempotency key or ''}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local idem = redis.call('HGET', KEYS[1], 'idempotency_key') or ''
if not string.find(ARGV[1], ' ' .. status .. ' ', 1, true) then return {0, status, idem} end
local ttl = tonumber(ARGV[2])
local n_set, n_delete = tonumber(ARGV[5]), tonumber(ARGV[6])
local first_key = 9
for i = 1, n_set do
  if ttl > 0 then
    redis.call('SET', KEYS[first_key - 1 + i], ARGV[6 + i], 'PX', ttl)
  else
    redis.call('SET', KEYS[first_key - 1 + i], ARGV[6 + i])
  end
end
local first_field = 7 + n_set
if #ARGV >= first_field then redis.call('HSET', KEYS[1], unpack(ARGV, first_field, #ARGV)) end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'type', ARGV[3], 'data', ARGV[4])
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local id = redis.call('HGET', KEYS[1], 'id')
  local held = redis.call('HGET', KEYS[4], id)
  if held then
    redis.call('DECRBY', KEYS[3], held)
    redis.call('HDEL', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
  end
  local owner_set = redis.call('HGET', KEYS[1], 'owner_set')
  if owner_set then redis.call('ZREM', owner_set, id) end
  if n_set > 0 then
    local stored = 0
    for i = 1, n_set do stored = stored + string.len(ARGV[6 + i]) end
    local clock = redis.call('TIME')
    local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    redis.call('INCRBY', KEYS[6], stored)
    redis.call('HSET', KEYS[7], id, stored)
    redis.call('ZADD', KEYS[8], now_ms + ttl, id)
  end
end
for i = 1, n_delete do redis.call('DEL', KEYS[first_key - 1 + n_set + i]) end
return {1, status, idem}
"""

# Decide what to do with one delivery of a job, counting it if it may run.
# Crash attribution: a job taken over from a worker that held only it ("sole") is
# charged one crash; one taken over from a worker that held several ("shared") is
# not charged (the crash may be another job's) but becomes a suspect, which is
# handed out alone (``ClaimedJob.exclusive``), so if it is the culprit its next
# crash is a sole one. The job fails once its crashes reach max deliveries.
_DELIVER_LUA = """
-- KEYS[1] job hash, KEYS[2] cancel key
-- ARGV[1] max deliveries, ARGV[2] "new" | "takeover", ARGV[3] consumer taken over from,
-- ARGV[4] entries that consumer held
-- Returns {'missing'} (no record: evicted, lost in a restart, or past its age limit: a lost job)
--       | {'finished'} (terminal: a redelivery after its outcome was stored) | {'cancel'} | {'exceeded', n}
--       | {'deliver', deliveries, released 0|1, params, n_images, input_names, exclusive 0|1}
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status ~= 'queued' and status ~= 'running' then return {'finished'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancel'} end
local deliveries
local released = redis.call('HDEL', KEYS[1], 'released')
if released == 1 then
  deliveries = tonumber(redis.call('HGET', KEYS[1], 'deliveries') or '0')
else
  deliveries = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
  if ARGV[2] == 'takeover' then
    local shared_with = redis.call('HGET', KEYS[1], 'shared_with')
    if tonumber(ARGV[4]) > 1 or shared_with == ARGV[3] then
      redis.call('HSET', KEYS[1], 'suspect', '1')
    else
      redis.call('HINCRBY', KEYS[1], 'crashes', 1)
    end
  end
end
redis.call('HDEL', KEYS[1], 'shared_with')
local crashes = tonumber(redis.call('HGET', KEYS[1], 'crashes') or '0')
if crashes >= tonumber(ARGV[1]) then return {'exceeded', deliveries} end
local fields = redis.call('HMGET', KEYS[1], 'params', 'n_images', 'input_names', 'suspect')
return {'deliver', deliveries, released, fields[1], fields[2], fields[3], fields[4] and 1 or 0}
"""

# Fair claiming across callers (API keys, or client addresses: a job's owner set). The stream is
# first in, first out, so one caller's backlog would all be claimed before another caller's job
# queued behind it. Before a fresh delivery is counted, this compares its owner with the owners of
# the jobs waiting behind it (the next ARGV[5] entries, at most ARGV[6] owners): if one of them has
# fewer jobs out on workers (delivered and unfinished), the delivery yields its turn: its entry
# moves to the tail (same job, new entry id, nothing counted) and the claim reads on, taking the
# waiting job next. It yields only to a job that is waiting, so no worker idles for fairness.
_TURN_LUA = """
-- KEYS[1] jobs stream, KEYS[2] job hash
-- ARGV[1] entry id, ARGV[2] job id, ARGV[3] consumer group, ARGV[4] job hash key prefix,
-- ARGV[5] entries to look at behind this one, ARGV[6] most other owners to compare
-- Returns {'keep'} | {'yield', new entry id}
local job = redis.call('HMGET', KEYS[2], 'owner_set', 'deliveries', 'status')
if not job[1] or job[3] ~= 'queued' or tonumber(job[2] or '0') > 0 then return {'keep'} end
local function out_on_workers(owner_set)
  local n = 0
  for _, id in ipairs(redis.call('ZRANGE', owner_set, 0, -1)) do
    local fields = redis.call('HMGET', ARGV[4] .. id, 'deliveries', 'status')
    if (fields[2] == 'queued' or fields[2] == 'running') and tonumber(fields[1] or '0') > 0 then n = n + 1 end
  end
  return n
end
local mine = out_on_workers(job[1])
if mine == 0 then return {'keep'} end
local compared, n_compared = {}, 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[5]))) do
  local fields, other_id = entry[2], nil
  for i = 1, #fields, 2 do if fields[i] == 'job_id' then other_id = fields[i + 1] end end
  if other_id then
    local other = redis.call('HMGET', ARGV[4] .. other_id, 'owner_set', 'deliveries', 'status')
    if other[1] and other[1] ~= job[1] and other[3] == 'queued' and tonumber(other[2] or '0') == 0
        and not compared[other[1]] then
      compared[other[1]], n_compared = true, n_compared + 1
      if out_on_workers(other[1]) < mine then
        redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
        redis.call('XDEL', KEYS[1], ARGV[1])
        local moved = redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[2])
        redis.call('HSET', KEYS[2], 'message_id', moved)
        return {'yield', moved}
      end
      if n_compared >= tonumber(ARGV[6]) then return {'keep'} end
    end
  end
end
return {'keep'}
"""
#: Fair claiming (_TURN_LUA): waiting entries looked at behind a delivery, owners compared, and the
#: reads one claim makes after turns were yielded (each yield puts a waiting job first).
_TURN_LOOKAHEAD = 64
_TURN_OWNERS = 8
_TURN_READS = 8

# Remember which dead consumer held a job together with others (see _DELIVER_LUA), before
# any of its entries is taken over, so the last one taken is not mistaken for a sole holding.
_MARK_SHARED_LUA = """
-- KEYS: job hashes; ARGV[1] consumer name
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'shared_with', ARGV[1]) end
end
return #KEYS
"""

# The two byte budgets as they stand: each total less its expired holdings (the next submission gives
# them back). Read-only, so a scrape works on a full Redis (noeviction refuses writes) and on a replica.
_STORED_BYTES_LUA = """#!lua flags=no-writes
-- KEYS[1..3] input bytes total, by job, deadlines; KEYS[4..6] the same of result images
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function held(total, by_job, deadlines)
  local sum = tonumber(redis.call('GET', total) or '0')
  local expired = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now_ms, 'LIMIT', 0, 1000)
  if #expired > 0 then
    for _, bytes in ipairs(redis.call('HMGET', by_job, unpack(expired))) do sum = sum - tonumber(bytes or '0') end
  end
  return sum
end
return {held(KEYS[1], KEYS[2], KEYS[3]), held(KEYS[4], KEYS[5], KEYS[6])}
"""

# Count one request in the current minute of Redis's clock (the window key is the prefix plus
# that minute, built here because only the script knows the minute; a single Redis, not a cluster).
_RATE_LUA = """
local clock = redis.call('TIME')
local window = KEYS[1] .. math.floor(tonumber(clock[1]) / 60)
local count = redis.call('INCR', window)
if count == 1 then redis.call('EXPIRE', window, 120) end
return count
"""

# Report a worker alive: its heartbeat key (JSON info) and its expiry, scored in a sorted set so that
# counting live workers is one ZCOUNT instead of a SCAN of the keyspace. Redis's clock scores every
# entry, so API and worker hosts need not agree on the time.
_HEARTBEAT_LUA = """
-- KEYS[1] heartbeat key, KEYS[2] heartbeat set; ARGV[1] worker id, ARGV[2] info JSON, ARGV[3] ttl ms
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], now_ms + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# Live workers: entries of the heartbeat set whose expiry is still ahead (by Redis's clock).
_WORKERS_ALIVE_LUA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf')
"""

# Delete an idempotency key only if it still names the given (expired) job.
_DELETE_IF_EQUAL_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# What a client may learn about an error reply (the reply itself goes to the log).
_REPLY_KINDS = {ReadOnlyError: "is a read-only replica", RedisOutOfMemoryError: "is out of memory"}


def _translate_redis_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn Redis failures into :class:`QueueUnavailable` (the API's 503, the worker's retry).

    Connection failures, and error replies: ``READONLY`` (a replica after a
    failover), ``MISCONF`` (persistence failing, e.g. a full disk), ``OOM``
    (``maxmemory`` reached under ``noeviction``), ``LOADING`` and any other.
    The message names the reply's code only; the details (addresses, paths)
    go to the log.
    """

    @functools.wraps(method)
    async def wrapper(self: "RedisStreamsQueue", *args: Any, **kwargs: Any) -> T:
        try:
            return await method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # The group may be gone when Redis comes back (restart without persistence).
            self._group_ready = False
            log.warning("redis unreachable in %s: %s", method.__name__, exc)
            raise QueueUnavailable("redis unreachable") from exc
        except ResponseError as exc:
            log.warning("redis error reply in %s: %s", method.__name__, exc)
            raise QueueUnavailable(f"redis {_REPLY_KINDS.get(type(exc), 'error reply')}") from exc

    return wrapper


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _float_or_none(value: bytes | None) -> float | None:
    text = _text(value)
    return float(text) if text else None


def _record_from_hash(fields: dict[bytes, bytes]) -> JobRecord:
    """Build a :class:`JobRecord` from a job hash as HGETALL returns it."""
    get = lambda name: fields.get(name.encode())  # noqa: E731 - a local shorthand
    return JobRecord(
        id=_text(get("id")) or "",
        status=JobStatus(_text(get("status"))),
        params=json.loads(get("params") or b"{}"),
        progress=JobProgress(step=int(get("progress_step") or 0), total=int(get("progress_total") or 0)),
        error=_text(get("error")) or None,
        failure=_failure_from_hash(get),
        queued_at=_float_or_none(get("queued_at")),
        started_at=_float_or_none(get("started_at")),
        finished_at=_float_or_none(get("finished_at")),
        worker=_text(get("worker")) or None,
        deliveries=int(get("deliveries") or 0),
        n_images=int(get("n_images") or 0),
        image_seeds=json.loads(get("image_seeds") or b"[]"),
        timings=json.loads(get("timings") or b"{}"),
    )


def _failure_from_hash(get: Callable[[str], bytes | None]) -> Failure | None:
    kind = _text(get("error_kind"))
    if not kind:
        return None
    return Failure(FailureKind(kind), _text(get("error_message")) or "", _text(get("error_field")) or None)


def _failure_fields(failure: Failure) -> dict[str, str]:
    """Hash fields of a failed job: the structured failure and its one-line form."""
    return {
        "error": str(failure),
        "error_kind": failure.kind.value,
        "error_message": failure.message,
        "error_field": failure.field or "",
    }


@dataclass(frozen=True)
class _TakeOver:
    """An idle delivery this worker took over, and from whom."""

    message_id: str
    job_id: str
    consumer: str  # who held it: a dead or stalled worker, or the ``released`` consumer
    consumer_held: int  # how many entries that consumer held (1: this job alone)


@dataclass(frozen=True)
class _TransitionOutcome:
    applied: bool
    previous: JobStatus | None  # None: the job does not exist (never did, or expired)


class RedisStreamsQueue(JobQueue):
    """:class:`JobQueue` on Redis Streams; safe to share between API replicas and many workers."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_queue: int,
        claim_timeout_s: float,
        max_deliveries: int,
        result_ttl_s: float,
        heartbeat_ttl_s: float,
        max_input_bytes: int = 512 * 1024 * 1024,
        max_result_bytes: int = 1 << 62,
        max_unfinished_per_owner: int = 1_000_000,
        max_job_age_s: float = 24 * 3600,
        prefix: str = DEFAULT_PREFIX,
        blocking_client: aioredis.Redis | None = None,
        blocking_reads: int = 32,
        command_timeout_s: float = 10.0,
    ) -> None:
        """Use ``client`` (created with ``decode_responses=False``: images are bytes).

        Blocking event reads go to ``blocking_client`` (default: ``client``), at most
        ``blocking_reads`` at once: however many event streams and synchronous waits are
        open, they never hold the connections other commands need; each fails if no reply
        comes within its block time plus ``command_timeout_s``.
        """
        self._redis = client
        self._command_timeout_s = command_timeout_s
        self._blocking_redis = blocking_client if blocking_client is not None else client
        self._blocking_slots = asyncio.Semaphore(blocking_reads)
        self._keys = RedisKeys(prefix)
        self._max_queue = max_queue
        self._claim_timeout_ms = max(1, int(claim_timeout_s * 1000))
        self._max_deliveries = max_deliveries
        self._result_ttl_ms = max(1, int(result_ttl_s * 1000))
        self._heartbeat_ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self._max_input_bytes = max_input_bytes
        self._max_result_bytes = max_result_bytes
        self._max_unfinished_per_owner = max_unfinished_per_owner
        self._job_age_ms = max(1, int(max_job_age_s * 1000))
        self._next_consumer_sweep = 0.0
        self._group_ready = False
        self._submit_script = client.register_script(_SUBMIT_LUA)
        self._transition_script = client.register_script(_TRANSITION_LUA)
        self._deliver_script = client.register_script(_DELIVER_LUA)
        self._turn_script = client.register_script(_TURN_LUA)
        self._delete_if_equal_script = client.register_script(_DELETE_IF_EQUAL_LUA)
        self._heartbeat_script = client.register_script(_HEARTBEAT_LUA)
        self._workers_alive_script = client.register_script(_WORKERS_ALIVE_LUA)
        self._mark_shared_script = client.register_script(_MARK_SHARED_LUA)
        self._rate_script = client.register_script(_RATE_LUA)
        self._stored_bytes_script = client.register_script(_STORED_BYTES_LUA)
        self.counters = QueueCounters()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 64,
        blocking_connections: int = 32,
        pool_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        **limits: Any,
    ) -> "RedisStreamsQueue":
        """Connect to ``url`` lazily (nothing is sent before the first call).

        Two bounded pools: ``max_connections`` for ordinary commands (a command
        waits up to ``pool_timeout_s`` for a free connection, then the call
        fails with :class:`QueueUnavailable`) and ``blocking_connections`` for
        blocking event reads only. A reply that takes longer than
        ``command_timeout_s`` (beyond a blocking read's own block time) fails the
        call with :class:`QueueUnavailable`: a Redis that hangs instead of
        dying is a 503, not a request that never ends.
        """

        def client(size: int, socket_timeout: float | None) -> aioredis.Redis:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=size,
                timeout=pool_timeout_s,
                decode_responses=False,
                protocol=2,
                socket_connect_timeout=2.0,
                # Set explicitly either way (redis-py otherwise applies its own default).
                socket_timeout=socket_timeout,
                # One immediate retry re-opens a pooled connection that died with a
                # Redis restart; more retries would only delay the 503.
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
            )
            return aioredis.Redis.from_pool(pool)

        # The ordinary pool's blocking command, the worker's XREADGROUP, blocks well under a second; the
        # blocking pool's XREADs block for as long as asked, so their bound is set per read.
        return cls(
            client(max_connections, command_timeout_s),
            blocking_client=client(blocking_connections, None),
            blocking_reads=blocking_connections,
            command_timeout_s=command_timeout_s,
            **limits,
        )

    @property
    def keys(self) -> RedisKeys:
        """The key names this queue uses."""
        return self._keys

    @property
    def client(self) -> aioredis.Redis:
        """The underlying Redis client (tests inspect raw keys with it)."""
        return self._redis

    async def warn_if_evicting(self) -> None:
        """Warn once if ``maxmemory-policy`` is not ``noeviction``: every job key carries a TTL, so even
        a ``volatile-*`` policy may evict a queued job's record, and the job is lost. Managed Redis may
        refuse ``CONFIG``; then (or if Redis is down) nothing is said."""
        try:
            reply = await asyncio.wait_for(self._redis.config_get("maxmemory-policy"), self._command_timeout_s)
        except Exception:  # noqa: BLE001 - advisory only: CONFIG refused, renamed, or Redis unreachable
            return
        policy = next((_text(value) for key, value in (reply or {}).items() if _text(key) == "maxmemory-policy"), None)
        if policy and policy != "noeviction":
            log.warning(
                "Redis maxmemory-policy is %s, not noeviction: under memory pressure Redis may evict job data, "
                "and a queued job whose record is evicted is lost (counted as failed, reason lost); run Redis "
                "with maxmemory-policy noeviction", policy,
            )

    async def close(self) -> None:
        await self._redis.aclose()
        if self._blocking_redis is not self._redis:
            await self._blocking_redis.aclose()

    # ------------------------------------------------------------ client side

    @_translate_redis_errors
    async def submit(
        self,
        params: dict[str, Any],
        inputs: dict[str, bytes],
        n_images: int,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> JobRecord:
        for _ in range(3):  # the retry only happens when an idempotency key names an expired job
            job_id = uuid.uuid4().hex
            now = time.time()
            input_names = sorted(inputs)
            hash_fields: dict[str, str] = {
                "id": job_id,
                "status": JobStatus.QUEUED.value,
                "params": json.dumps(params),
                "input_names": json.dumps(input_names),
                "n_images": str(n_images),
                "queued_at": repr(now),
                "deliveries": "0",
                "progress_step": "0",
                "progress_total": "0",
            }
            if idempotency_key is not None:
                hash_fields["idempotency_key"] = idempotency_key
            idem_key = self._keys.idempotency(idempotency_key or "")
            keys = [
                self._keys.jobs_stream,
                self._keys.job(job_id),
                self._keys.job_events(job_id),
                idem_key,
                *self._keys.byte_budget("inputs"),
                self._keys.owner_jobs(owner or ANONYMOUS_OWNER),
                *self._keys.byte_budget("results"),
                *(self._keys.job_input(job_id, name) for name in input_names),
            ]
            args: list[Any] = [
                job_id,
                self._max_queue,
                "1" if idempotency_key is not None else "0",
                self._job_age_ms,
                json.dumps({}),
                self._max_input_bytes,
                self._max_unfinished_per_owner,
                self._max_result_bytes,
                len(input_names),
                *(inputs[name] for name in input_names),
                *(item for pair in hash_fields.items() for item in pair),
            ]
            outcome, detail, *limit = await self._submit_script(keys=keys, args=args)
            outcome, detail = _text(outcome), _text(detail)
            if outcome in _FULL_LIMITS:
                retry_after_s = max(1.0, int(_text(limit[1]) or 0) / 1000) if len(limit) > 1 else 5.0
                raise QueueFull(
                    int(detail or 0), int(_text(limit[0]) or 0), retry_after_s=retry_after_s,
                    limit=_FULL_LIMITS[outcome],
                )
            if outcome == "created":
                record = await self.get(job_id)
                assert record is not None, "job hash written by the submit script"
                return record
            existing = await self.get(detail or "")
            if existing is not None:
                return existing
            # The key outlived its job (eviction, crash before its TTL refresh): forget it, retry.
            await self._delete_if_equal_script(keys=[idem_key], args=[detail])
        raise RuntimeError("idempotency key kept naming an expired job")

    @_translate_redis_errors
    async def get(self, job_id: str) -> JobRecord | None:
        fields = await self._redis.hgetall(self._keys.job(job_id))
        return _record_from_hash(fields) if fields else None

    @_translate_redis_errors
    async def get_image(self, job_id: str, index: int) -> bytes | None:
        if index < 0:
            return None
        return await self._redis.get(self._keys.job_image(job_id, index))

    @_translate_redis_errors
    async def events(self, job_id: str, after: str | None = None, block_ms: int = 0) -> list[JobEvent]:
        if after is not None and parse_event_id(after) is None:
            raise ValueError(f"not an event id: {after!r}")
        streams = {self._keys.job_events(job_id): after or "0-0"}
        if block_ms > 0:
            response = await self._blocking_read(streams, block_ms)
        else:
            response = await self._redis.xread(streams)
        events: list[JobEvent] = []
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                events.append(
                    JobEvent(
                        id=_text(entry_id) or "",
                        type=EventType(_text(fields[b"type"])),
                        data=json.loads(fields.get(b"data") or b"{}"),
                    )
                )
        return events

    @_translate_redis_errors
    async def cancel(self, job_id: str) -> JobRecord | None:
        record_fields = await self._redis.hgetall(self._keys.job(job_id))
        if not record_fields:
            return None
        input_names = json.loads(record_fields.get(b"input_names") or b"[]")
        outcome = await self._transition(
            job_id,
            allowed=(JobStatus.QUEUED,),
            fields={"status": JobStatus.CANCELED.value, "finished_at": repr(time.time())},
            event=(EventType.CANCELED, {}),
            finish=True,
            input_names=input_names,
        )
        if outcome.applied:
            self.counters.canceled_queued += 1  # no worker finishes it, so none counts it
            # Drop the stream entry so no worker ever receives it and depth shrinks now.
            # If a worker already holds it, it acks it when it sees the status.
            message_id = _text(record_fields.get(b"message_id"))
            if message_id:
                await self._redis.xdel(self._keys.jobs_stream, message_id)
        elif outcome.previous == JobStatus.RUNNING:
            # The worker checks this flag every tick; the TTL bounds a stray flag's life.
            await self._redis.set(self._keys.job_cancel(job_id), b"1", px=self._result_ttl_ms)
        return await self.get(job_id)

    @_translate_redis_errors
    async def depth(self) -> int:
        return int(await self._redis.xlen(self._keys.jobs_stream))

    @_translate_redis_errors
    async def ping(self) -> None:
        await self._redis.ping()

    @_translate_redis_errors
    async def memory(self) -> tuple[int, int] | None:
        info = await self._redis.info("memory")
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    @_translate_redis_errors
    async def stored_bytes(self) -> dict[str, tuple[int, int]]:
        inputs, results = await self._stored_bytes_script(
            keys=[*self._keys.byte_budget("inputs"), *self._keys.byte_budget("results")]
        )
        return {"inputs": (int(inputs), self._max_input_bytes), "results": (int(results), self._max_result_bytes)}

    @_translate_redis_errors
    async def workers_alive(self) -> int:
        return int(await self._workers_alive_script(keys=[self._keys.worker_heartbeats]))

    @_translate_redis_errors
    async def rate_limit(self, key: str, per_minute: int) -> bool:
        # The minute is Redis's, so every API replica counts in the same window whatever its own clock says.
        count = await self._rate_script(keys=[self._keys.rate_prefix(key)], args=[])
        return int(count) <= per_minute

    @_translate_redis_errors
    async def note_waiting(self, caller: str, job_id: str, ttl_s: float) -> None:
        await self._redis.set(self._keys.waiting(caller), job_id, px=max(1, int(ttl_s * 1000)))

    @_translate_redis_errors
    async def waiting_job(self, caller: str) -> str | None:
        value = await self._redis.get(self._keys.waiting(caller))
        return None if value is None else value.decode()

    @_translate_redis_errors
    async def forget_waiting(self, caller: str, job_id: str) -> None:
        # (a later wait of the same caller stays)
        await self._delete_if_equal_script(keys=[self._keys.waiting(caller)], args=[job_id])

    # ------------------------------------------------------------ worker side

    @_translate_redis_errors
    async def claim(self, worker_id: str, max_jobs: int, block_ms: int = 0) -> list[ClaimedJob]:
        if max_jobs <= 0:
            return []
        claimed: list[ClaimedJob] = []
        for take_over in await self._take_over_idle(worker_id, max_jobs):
            job = await self._accept_delivery(
                take_over.message_id, take_over.job_id, take_over=take_over, worker_id=worker_id
            )
            if job is not None:
                claimed.append(job)
                if job.exclusive:
                    return claimed  # a suspect runs alone: nothing new with it
        await self._remove_dead_consumers(worker_id)
        for read in range(_TURN_READS):
            remaining = max_jobs - len(claimed)
            if remaining <= 0:
                break
            # Block only when there is nothing to hand out yet; taken-over jobs go out at once.
            block = block_ms if block_ms > 0 and not claimed and read == 0 else None
            response = await self._with_group(
                lambda: self._redis.xreadgroup(
                    self._keys.consumer_group,
                    worker_id,
                    {self._keys.jobs_stream: ">"},
                    count=remaining,
                    block=block,
                )
            )
            yielded = 0
            for _stream, entries in response or []:
                for message_id, fields in entries:
                    message_id, job_id = _text(message_id) or "", _text((fields or {}).get(b"job_id")) or ""
                    if await self._yields_turn(message_id, job_id):
                        yielded += 1
                        continue
                    job = await self._accept_delivery(message_id, job_id, take_over=None, worker_id=worker_id)
                    if job is not None:
                        claimed.append(job)
            if not yielded:
                break
        return claimed

    async def _yields_turn(self, message_id: str, job_id: str) -> bool:
        """Whether this fresh delivery gave its turn to another caller's waiting job (``_TURN_LUA``)."""
        verdict, *_ = await self._with_group(
            lambda: self._turn_script(
                keys=[self._keys.jobs_stream, self._keys.job(job_id)],
                args=[message_id, job_id, self._keys.consumer_group, self._keys.job(""), _TURN_LOOKAHEAD, _TURN_OWNERS],
            )
        )
        return _text(verdict) == "yield"

    @_translate_redis_errors
    async def load_input(self, job_id: str, name: str) -> bytes | None:
        return await self._redis.get(self._keys.job_input(job_id, name))

    @_translate_redis_errors
    async def mark_running(self, job: ClaimedJob, worker_id: str) -> bool:
        outcome = await self._transition(
            job.job_id,
            allowed=_UNFINISHED,
            fields={"status": JobStatus.RUNNING.value, "worker": worker_id, "started_at": repr(time.time())},
            event=(EventType.RUNNING, {"worker": worker_id, "deliveries": job.deliveries}),
            finish=False,
        )
        return outcome.applied

    @_translate_redis_errors
    async def keep_alive(self, worker_id: str, jobs: Sequence[ClaimedJob]) -> list[ClaimedJob]:
        if not jobs:
            return []

        async def pending_owners() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.xpending_range(
                        self._keys.jobs_stream, self._keys.consumer_group, job.message_id, job.message_id, 1
                    )
                return await pipe.execute()

        owners = await self._with_group(pending_owners)
        held = [job for job, rows in zip(jobs, owners) if rows and _text(rows[0]["consumer"]) == worker_id]
        if held:
            # XCLAIM by the owner itself resets the idle time; JUSTID leaves the delivery count alone.
            await self._with_group(
                lambda: self._redis.xclaim(
                    self._keys.jobs_stream,
                    self._keys.consumer_group,
                    worker_id,
                    0,
                    [job.message_id for job in held],
                    justid=True,
                )
            )
        held_ids = {job.message_id for job in held}
        return [job for job in jobs if job.message_id not in held_ids]

    @_translate_redis_errors
    async def progress(self, job_id: str, step: int, total: int) -> None:
        await self._transition(
            job_id,
            allowed=(JobStatus.RUNNING,),
            fields={"progress_step": str(step), "progress_total": str(total)},
            event=(EventType.PROGRESS, {"step": step, "total": total}),
            finish=False,
        )

    @_translate_redis_errors
    async def is_canceled(self, job_id: str) -> bool:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._keys.job_cancel(job_id))
            pipe.hget(self._keys.job(job_id), "status")
            cancel_flag, status = await pipe.execute()
        # A vanished job (expired, or Redis restarted empty) has nobody waiting for it: stop too.
        return bool(cancel_flag) or status is None or _text(status) == JobStatus.CANCELED.value

    @_translate_redis_errors
    async def complete(
        self, job: ClaimedJob, images: list[bytes], seeds: list[int], timings: dict[str, float]
    ) -> bool:
        outcome = await self._transition(
            job.job_id,
            allowed=_UNFINISHED,
            fields={
                "status": JobStatus.SUCCEEDED.value,
                "finished_at": repr(time.time()),
                "n_images": str(len(images)),
                "image_seeds": json.dumps(list(seeds)),
                "timings": json.dumps(timings),
            },
            event=(EventType.SUCCEEDED, {"n_images": len(images), "seeds": list(seeds), "timings": timings}),
            finish=True,
            input_names=job.input_names,
            set_values={self._keys.job_image(job.job_id, k): image for k, image in enumerate(images)},
        )
        await self._ack(job.message_id)  # only now: the result is stored
        return outcome.applied

    @_translate_redis_errors
    async def fail(self, job: ClaimedJob, failure: Failure) -> bool:
        applied = await self._fail(job.job_id, job.input_names, failure)
        await self._ack(job.message_id)
        return applied

    @_translate_redis_errors
    async def finish_canceled(self, job: ClaimedJob) -> bool:
        applied = await self._finish_canceled(job.job_id, job.input_names)
        await self._ack(job.message_id)
        return applied

    @_translate_redis_errors
    async def release(self, job: ClaimedJob) -> None:
        outcome = await self._transition(
            job.job_id,
            allowed=_UNFINISHED,
            fields={"status": JobStatus.QUEUED.value, "worker": "", "released": "1"},
            event=(EventType.QUEUED, {"released": True}),
            finish=False,
        )
        if not outcome.applied:
            await self._ack(job.message_id)  # finished or gone: nothing to hand back
            return
        await self._with_group(
            lambda: self._redis.xclaim(
                self._keys.jobs_stream,
                self._keys.consumer_group,
                self._keys.released_consumer,
                0,
                [job.message_id],
                idle=max(_RELEASED_IDLE_MS, 2 * self._claim_timeout_ms),
                justid=True,
            )
        )

    @_translate_redis_errors
    async def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        payload = json.dumps({**info, "worker_id": worker_id, "at": time.time()})
        await self._heartbeat_script(
            keys=[self._keys.worker_heartbeat(worker_id), self._keys.worker_heartbeats],
            args=[worker_id, payload, self._heartbeat_ttl_ms],
        )

    # --------------------------------------------------------------- helpers

    async def _blocking_read(self, streams: dict[str, str], block_ms: int) -> Any:
        """XREAD BLOCK on the blocking pool; no events if no connection frees up within ``block_ms``.

        Waiting for a slot counts against the block time, so a saturated pool
        looks to the caller like a quiet stream (it polls again) and never
        like an outage.
        """
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._blocking_slots.acquire(), block_ms / 1000)
        except TimeoutError:
            return []
        try:
            remaining_ms = block_ms - int((time.monotonic() - started) * 1000)
            read = self._blocking_redis.xread(streams, block=remaining_ms if remaining_ms > 0 else None)
            try:
                # Cancelling the read drops its connection (redis-py), so a late reply cannot be misread.
                return await asyncio.wait_for(read, max(remaining_ms, 0) / 1000 + self._command_timeout_s)
            except TimeoutError:
                raise RedisTimeoutError("no reply to a blocking read within its block time") from None
        finally:
            self._blocking_slots.release()

    async def _ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists.

        Starting at id 0 delivers entries added before the group existed, e.g.
        jobs submitted right after an empty Redis restart, before any worker.
        """
        try:
            await self._redis.xgroup_create(self._keys.jobs_stream, self._keys.consumer_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _with_group(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a consumer-group command, (re)creating the group if Redis lost it."""
        if not self._group_ready:
            await self._ensure_group()
        try:
            return await call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False
            await self._ensure_group()
            return await call()

    async def _take_over_idle(self, worker_id: str, max_jobs: int) -> list["_TakeOver"]:
        """XCLAIM up to ``max_jobs`` entries idle longer than the claim timeout, saying whose they were.

        A suspect job (see :data:`_DELIVER_LUA`) is taken alone (``exclusive``): its
        worker claims nothing more and runs it once its other jobs are done. Entries whose job was deleted (canceled while held)
        are acknowledged. Before the first entry of a dead consumer that held several
        is taken, all its jobs are marked as held together.
        """
        stream, group = self._keys.jobs_stream, self._keys.consumer_group
        summary = await self._with_group(lambda: self._redis.xpending(stream, group))
        if not summary or not summary.get("pending"):
            return []
        held = {_text(row["name"]) or "": int(row["pending"]) for row in summary.get("consumers") or []}
        rows = await self._with_group(
            lambda: self._redis.xpending_range(
                stream, group, min="-", max="+", count=max(100, 10 * max_jobs), idle=self._claim_timeout_ms
            )
        )
        if not rows:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xrange(stream, row["message_id"], row["message_id"], count=1)
            entries = await pipe.execute()
        job_ids = [_text(found[0][1].get(b"job_id")) if found else None for found in entries]
        deleted = [row["message_id"] for row, job_id in zip(rows, job_ids) if job_id is None]
        if deleted:  # canceled while a dead worker held it: nothing to run
            await self._redis.xack(stream, group, *deleted)
        live = [(row, job_id) for row, job_id in zip(rows, job_ids) if job_id is not None]
        for consumer in {_text(row["consumer"]) or "" for row, _ in live}:
            if consumer not in (self._keys.released_consumer, worker_id) and held.get(consumer, 0) > 1:
                await self._mark_held_together(consumer, held[consumer])
        async with self._redis.pipeline(transaction=False) as pipe:
            for _row, job_id in live:
                pipe.hmget(self._keys.job(job_id), "suspect", "shared_with")
            flags = await pipe.execute()
        chosen: list[_TakeOver] = []
        for (row, job_id), (suspect, shared_with) in zip(live, flags):
            if len(chosen) >= max_jobs:
                break
            consumer = _text(row["consumer"]) or ""
            take = _TakeOver(_text(row["message_id"]) or "", job_id, consumer, held.get(consumer, 0))
            # Suspect already, or about to become one (taken from a crash it shared): see _DELIVER_LUA.
            # Our own idle entries (renewals failed through an outage) are no crash at all.
            shared_crash = consumer not in (self._keys.released_consumer, worker_id) and (
                take.consumer_held > 1 or _text(shared_with) == consumer
            )
            if suspect or shared_crash:
                if chosen:
                    continue  # a suspect goes out alone: left for the next claim
                chosen = [take]
                break
            chosen.append(take)
        if not chosen:
            return []
        taken = await self._with_group(
            lambda: self._redis.xclaim(
                stream, group, worker_id, self._claim_timeout_ms, [t.message_id for t in chosen], justid=True
            )
        )
        # Another worker may have taken some first (XCLAIM with a minimum idle time is the arbiter).
        taken_ids = {_text(message_id) for message_id in taken}
        return [t for t in chosen if t.message_id in taken_ids]

    async def _mark_held_together(self, consumer: str, count: int) -> None:
        rows = await self._redis.xpending_range(
            self._keys.jobs_stream, self._keys.consumer_group, min="-", max="+", count=count, consumername=consumer
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xrange(self._keys.jobs_stream, row["message_id"], row["message_id"], count=1)
            entries = await pipe.execute()
        job_keys = [self._keys.job(_text(found[0][1].get(b"job_id")) or "") for found in entries if found]
        if job_keys:
            await self._mark_shared_script(keys=job_keys, args=[consumer])

    async def _remove_dead_consumers(self, worker_id: str) -> None:
        """Delete group consumers that hold nothing and whose worker's heartbeat is gone.

        Cheap, but not needed on every claim: at most once per claim timeout per process.
        Deleting a consumer with no pending entries loses nothing, and a live worker
        wrongly taken for dead is recreated by its next XREADGROUP.
        """
        now = time.monotonic()
        if now < self._next_consumer_sweep:
            return
        self._next_consumer_sweep = now + self._claim_timeout_ms / 1000
        consumers = await self._with_group(
            lambda: self._redis.xinfo_consumers(self._keys.jobs_stream, self._keys.consumer_group)
        )
        idle = [
            _text(row["name"]) or ""
            for row in consumers
            if int(row["pending"]) == 0 and _text(row["name"]) not in (worker_id, self._keys.released_consumer)
        ]
        if not idle:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in idle:
                pipe.exists(self._keys.worker_heartbeat(name))
            alive = await pipe.execute()
        for name, beating in zip(idle, alive):
            if not beating:
                await self._redis.xgroup_delconsumer(self._keys.jobs_stream, self._keys.consumer_group, name)

    async def _accept_delivery(
        self, message_id: str, job_id: str, *, take_over: "_TakeOver | None", worker_id: str
    ) -> ClaimedJob | None:
        """Count a delivery and return the job if it may run; otherwise settle and ack it."""
        args: list[Any] = [self._max_deliveries, "new", "", 0]
        if take_over is not None and take_over.consumer != worker_id:
            args = [self._max_deliveries, "takeover", take_over.consumer, take_over.consumer_held]
        verdict, *rest = await self._deliver_script(
            keys=[self._keys.job(job_id), self._keys.job_cancel(job_id)], args=args
        )
        verdict = _text(verdict)
        if verdict == "deliver":
            deliveries, released, params, n_images, input_names, exclusive = rest
            reclaimed = take_over is not None and not int(released)
            if reclaimed:
                self.counters.reclaimed += 1
            return ClaimedJob(
                job_id=job_id,
                message_id=message_id,
                params=json.loads(params or b"{}"),
                n_images=int(n_images or 0),
                input_names=tuple(json.loads(input_names or b"[]")),
                deliveries=int(deliveries),
                reclaimed=reclaimed,
                exclusive=bool(int(exclusive)),
            )
        input_names = tuple(json.loads(await self._redis.hget(self._keys.job(job_id), "input_names") or b"[]"))
        # Settled here, so the worker never sees these jobs: their transitions are logged here.
        if verdict == "exceeded":
            await self._fail(job_id, input_names, Failure.max_deliveries(self._max_deliveries))
            self.counters.failed_max_deliveries += 1
            log.info("job %s failed on worker %s, reason %s", job_id, worker_id, FailureKind.MAX_DELIVERIES.value)
        elif verdict == "cancel":
            await self._finish_canceled(job_id, input_names)
            self.counters.canceled_on_claim += 1
            log.info("job %s canceled on worker %s (by its client, before this delivery)", job_id, worker_id)
        elif verdict == "missing":
            # The stream entry outlived the job's record: evicted (a maxmemory-policy other than
            # noeviction), Redis restarted without persistence, or the job waited past its age limit.
            # A finished job's record outlives any redelivery of it (result_ttl_s), so this is a loss.
            self.counters.lost_on_claim += 1
            log.warning(
                "job %s lost: its record is gone from Redis before worker %s could run it (evicted under a "
                "maxmemory-policy other than noeviction, Redis restarted without persistence, or the job "
                "outlived EDIFFI_MAX_JOB_AGE_S); counted as failed, reason lost",
                job_id, worker_id,
            )
        else:  # "finished": a redelivery after the outcome was stored (its worker died before the ack)
            self.counters.skipped_finished += 1
        await self._ack(message_id)
        return None

    async def _fail(self, job_id: str, input_names: Iterable[str], failure: Failure) -> bool:
        outcome = await self._transition(
            job_id,
            allowed=_UNFINISHED,
            fields={"status": JobStatus.FAILED.value, **_failure_fields(failure), "finished_at": repr(time.time())},
            event=(EventType.FAILED, failed_event_data(failure)),
            finish=True,
            input_names=input_names,
        )
        return outcome.applied

    async def _finish_canceled(self, job_id: str, input_names: Iterable[str]) -> bool:
        outcome = await self._transition(
            job_id,
            allowed=_UNFINISHED,
            fields={"status": JobStatus.CANCELED.value, "finished_at": repr(time.time())},
            event=(EventType.CANCELED, {}),
            finish=True,
            input_names=input_names,
        )
        return outcome.applied

    async def _ack(self, message_id: str) -> None:
        """Acknowledge a delivery and delete its entry (the stream holds only unfinished jobs)."""
        async def ack_and_delete() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._keys.jobs_stream, self._keys.consumer_group, message_id)
                pipe.xdel(self._keys.jobs_stream, message_id)
                await pipe.execute()

        await self._with_group(ack_and_delete)

    async def _transition(
        self,
        job_id: str,
        *,
        allowed: Iterable[JobStatus],
        fields: dict[str, str],
        event: tuple[EventType, dict[str, Any]] | None,
        finish: bool,
        input_names: Iterable[str] = (),
        set_values: dict[str, bytes] | None = None,
    ) -> _TransitionOutcome:
        """Run the transition script.

        ``finish`` (a terminal transition) gives the hash, the events and the
        ``set_values`` keys a TTL of ``result_ttl_s``, deletes the inputs and
        the cancel flag, and refreshes the idempotency key's TTL to match.
        """
        set_values = set_values or {}
        delete_keys = (
            [self._keys.job_input(job_id, name) for name in input_names] + [self._keys.job_cancel(job_id)]
            if finish
            else []
        )
        keys = [
            self._keys.job(job_id),
            self._keys.job_events(job_id),
            *self._keys.byte_budget("inputs"),
            *self._keys.byte_budget("results"),
            *set_values,
            *delete_keys,
        ]
        event_type, event_data = event if event else ("", {})
        args: list[Any] = [
            " " + " ".join(status.value for status in allowed) + " ",
            self._result_ttl_ms if finish else 0,
            event_type.value if isinstance(event_type, EventType) else event_type,
            json.dumps(event_data),
            len(set_values),
            len(delete_keys),
            *set_values.values(),
            *(item for pair in fields.items() for item in pair),
        ]
        result = await self._transition_script(keys=keys, args=args)
        if result is None:
            return _TransitionOutcome(applied=False, previous=None)
        applied, previous, idempotency_key = int(result[0]), _text(result[1]), _text(result[2])
        if applied and finish and idempotency_key:
            # Remember the key as long as the finished job itself (it was set at submit time).
            await self._redis.pexpire(self._keys.idempotency(idempotency_key), self._result_ttl_ms)
        return _TransitionOutcome(applied=bool(applied), previous=JobStatus(previous))
