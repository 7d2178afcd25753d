"""Sweeps in shards: which shard owns a name, and the shard message that travels on the sweep topic.

A sweep too large for one invocation fans out (``functions.shards``): a coordinator publishes
one shard message per shard on the sweep topic, each shard reconciles its part, and the shard
that completes the set delivers DNS once and logs the one merged report. This module holds the
pure parts every side must agree on, defined once:

- **Assignment** is a hash of the name, never a name range: a name's shard depends only on the
  name and the shard count, so an ExternalService created or deleted while the sweep runs moves
  no other name to another shard (a range split computed by the coordinator would, and the
  shards would then lose or double names at the edges). Orphans are pruned by the shard their
  gateway name hashes to, so each is considered by exactly one shard. SHA-256, not ``hash()``:
  Python salts string hashes per process, and every instance must agree.
- **The shard message** is recognisably different from the scheduler's trigger (whose body the
  sweep never reads, as before): attribute ``kind`` and body ``kind`` are ``SweepShard``. It is
  decoded as strictly as a notice (``core.notice``): a malformed one is logged and acknowledged.
- **The sweep id** names one sweep in every log line and in its progress record. It is derived
  from the trigger's Pub/Sub message id *and* publish time, so a redelivered trigger (same id,
  same time) is the same sweep and fans out nothing new, while the emulator, which numbers
  messages from 1 again after a restart, cannot make a new trigger collide with an old sweep.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from core.notice import BadNotice, format_time, load_json, message_body, message_time

VERSION = 1
SHARD_KIND = "SweepShard"
# A sweep never has more shards than this, whatever SWEEP_SHARD_SIZE says: the progress record
# (one ConfigMap, at most 1 MiB) holds a bounded summary of every shard (functions.shards), and
# the completing shard reads them all.
MAX_SHARDS = 64
FIELDS = frozenset({"v", "kind", "sweep", "shard", "shards", "time"})
SWEEP_ID = re.compile(r"^[0-9a-f]{16}$")
# A shard message is ~120 bytes; anything much larger is not one.
MAX_SHARD_MESSAGE_BYTES = 1024


class BadShard(BadNotice):
    """A shard message that can never be processed; the text says why (it goes to the log)."""


def shard_of(name: str, shards: int) -> int:
    """The shard (0 .. shards-1) that owns ``name``: stable across processes and releases."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1 (got {shards})")
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_count(objects: int, shard_size: int) -> int:
    """How many shards a sweep over ``objects`` ExternalServices takes: 1 (no fan-out) when
    sharding is off (``shard_size`` 0) or they fit in one, else enough for ``shard_size`` each,
    at most MAX_SHARDS (then each shard is larger than ``shard_size``)."""
    if shard_size <= 0 or objects <= shard_size:
        return 1
    return min(MAX_SHARDS, -(-objects // shard_size))


def sweep_id_of(message_id: str, published: str) -> str:
    """The sweep id of a trigger: the same for every delivery of one Pub/Sub message; random
    when the message carries no id (then a redelivery is a new sweep, as a sweep was before)."""
    if not message_id:
        return uuid.uuid4().hex[:16]
    return hashlib.sha256(f"{message_id}\x00{published}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ShardMessage:
    sweep: str
    shard: int
    shards: int
    time: dt.datetime  # when the coordinator fanned out: the shard's age is measured from it

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": SHARD_KIND,
            "sweep": self.sweep,
            "shard": self.shard,
            "shards": self.shards,
            "time": format_time(self.time),
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()

    def attributes(self) -> dict[str, str]:
        """Pub/Sub attributes: a shard is told from a trigger without decoding the body."""
        return {"kind": SHARD_KIND, "sweep": self.sweep, "shard": str(self.shard)}

    @property
    def label(self) -> str:
        """``k/N`` as log lines show it (k from 0)."""
        return f"{self.shard}/{self.shards}"


def looks_like_shard(attributes: object, data: bytes | None) -> bool:
    """Whether a sweep-topic message claims to be a shard (then it must parse as one).

    By its attribute ``kind``, or by a body that is a JSON object whose ``kind`` is SweepShard
    (a shard message that lost its attributes must not start a whole sweep). Never raises:
    anything else is the scheduler's trigger, whose body is not read.
    """
    if isinstance(attributes, dict) and attributes.get("kind") == SHARD_KIND:
        return True
    if not data or len(data) > MAX_SHARD_MESSAGE_BYTES or b"SweepShard" not in data:
        return False
    try:
        body = load_json(data, "message data", BadShard)
    except BadNotice:
        return False
    return isinstance(body, dict) and body.get("kind") == SHARD_KIND


def parse_shard_message(data: bytes, attributes: object = None) -> ShardMessage:
    """Decode and validate a shard message; raises BadShard with the reason."""
    if not data:
        raise BadShard("shard message data is empty")
    if len(data) > MAX_SHARD_MESSAGE_BYTES:
        raise BadShard(
            f"shard message is larger than {MAX_SHARD_MESSAGE_BYTES} bytes ({len(data)} bytes)"
        )
    body = message_body(
        load_json(data, "shard message data", BadShard), "shard message", VERSION, FIELDS, BadShard
    )
    for key in ("kind", "sweep", "time"):
        if not isinstance(body[key], str):
            raise BadShard(f"field {key!r} must be a string, got {type(body[key]).__name__}")
    for key in ("shard", "shards"):
        if not isinstance(body[key], int) or isinstance(body[key], bool):
            raise BadShard(f"field {key!r} must be an integer, got {type(body[key]).__name__}")
    if body["kind"] != SHARD_KIND:
        raise BadShard(f"kind {body['kind'][:40]!r} is not {SHARD_KIND!r}")
    if not SWEEP_ID.match(body["sweep"]):
        raise BadShard(f"sweep {body['sweep'][:40]!r} is not a sweep id (16 hex digits)")
    shards, shard = body["shards"], body["shard"]
    if not 2 <= shards <= MAX_SHARDS:
        raise BadShard(f"shards must be from 2 to {MAX_SHARDS} (got {str(shards)[:20]})")
    if not 0 <= shard < shards:
        raise BadShard(f"shard must be from 0 to {shards - 1} (got {str(shard)[:20]})")
    when = message_time(body["time"], BadShard)
    message = ShardMessage(body["sweep"], shard, shards, when)
    _check_attributes(message, attributes)
    return message


def _check_attributes(message: ShardMessage, attributes: object) -> None:
    """Attributes, when present, must say what the body says (they are ours, set together)."""
    if attributes is None:
        return
    if not isinstance(attributes, dict):
        raise BadShard("message attributes are not a map")
    expected = message.attributes()
    for key, value in expected.items():
        got = attributes.get(key)
        if got is not None and got != value:
            shown = got[:40] if isinstance(got, str) else type(got).__name__
            raise BadShard(f"attribute {key} {shown!r} does not match the body ({value!r})")
