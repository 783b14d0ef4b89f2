"""The nightly run's steps on S3: lock, collect, shard, mask a shard, aggregate QA.

Plain functions over a boto3 S3 client and a ``Settings``; the DAG only wires them. Everything a
step passes on is an S3 URI or a small dict, never a key list or pixels. Every S3 call goes through
``storage.S3Store`` (``_store``); the keys come from ``layout``, the run's parameters from ``runspec``.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from .constants import DEFAULT_METADATA_POLICY
from .imageio import DECODE_FAULTS, ImageError, extension_supported
from .layout import audit_key, key_too_long, lock_keys, masked_key, qa_prefix, qa_run_prefix, run_prefix, s3_uri
from .runspec import RunError, RunSpec
from .settings import Settings
from .storage import IF_MATCH_FAILED_CODES, MISSING_CODES, PRECONDITION_CODES, S3Store, error_code, is_hidden, read_json_lines


def _store(client, settings: Settings) -> S3Store:
    """The run's bucket through the storage layer (with the run's encryption settings)."""
    return S3Store.for_settings(settings, client)


# ---------------------------------------------------------------- one run per region-window

def acquire_lock(client, settings: Settings, spec: RunSpec, *, is_live: Callable[[dict], bool],
                 log: Callable[[str], None] = print, owner: dict | None = None, reclaim: bool = False) -> dict | None:
    """Take the region's lock of every day the window touches for this run (:func:`lock_keys`, in day
    order) and return None, or return the lock document of the other (live) run that holds one of
    them (the days before it stay held by this run, which waits for that one: taken in order, two
    runs never wait on each other).

    Atomic through S3 conditional writes: ``IfNoneMatch="*"`` creates a lock; a released lock, or
    one left behind by a run that is no longer running (``is_live(lock)`` false), is taken over with
    ``IfMatch`` on its ETag, so of two runs racing exactly one wins. A retry of the holder finds its
    own lock (re-entrant). ``owner`` (e.g. the DAG id) is stored in the lock for ``is_live``.

    ``reclaim`` (a task of a run that has released its locks, cleared afterwards): take a lock again only
    when no other run has had it since, else return that run's lock document with ``superseded`` set (it
    masked the days again, or picked up their late photos: this run's manifest is no longer theirs).
    """
    for key in lock_keys(settings, spec):
        held = _acquire_one(client, settings, spec, key, is_live=is_live, log=log, owner=owner, reclaim=reclaim)
        if held is not None:
            return held
    return None


def _acquire_one(client, settings: Settings, spec: RunSpec, key: str, *, is_live: Callable[[dict], bool],
                 log: Callable[[str], None], owner: dict | None, reclaim: bool = False,
                 previous: list | None = None, reentered: list | None = None) -> dict | None:
    """Take the lock at ``key`` for ``spec``'s run; None when taken (or already this run's), else the live
    holder's document (``superseded`` with ``reclaim``: another run has had it since). ``previous`` gets
    the document this run's replaced (None: there was none), so a look that took nothing can put it back."""
    from botocore.exceptions import ClientError

    mine = {"state": "held", "run_id": spec.run_id, "run_key": spec.run_key, "region": spec.region,
            "window": spec.window.id, "day": key.rsplit("/", 1)[-1][: -len(".json")],
            "since": datetime.now(timezone.utc).isoformat(), **(owner or {})}
    for _ in range(10):
        try:
            _store(client, settings).put_json_conditional(key, mine, if_none_match=True)
            log(f"{spec.region} {spec.window.id}: lock s3://{settings.bucket}/{key} taken by run {spec.run_id}")
            if previous is not None:
                previous.append(None)
            return None
        except ClientError as exc:
            if error_code(exc) not in PRECONDITION_CODES:
                raise
        try:
            found = _store(client, settings).get_json(key)
        except ValueError:
            found = None, None  # unreadable lock: no owner to wait for
        if found is None:
            continue  # gone in between: try to create it again
        held, etag = found
        held = held if isinstance(held, dict) else {}
        if held.get("state") == "held" and held.get("run_id") == spec.run_id:
            if previous is not None:  # an earlier try of this task took it: what that try replaced
                previous.append(held.get("replaced") if isinstance(held.get("replaced"), dict) else None)
            if reentered is not None:
                reentered.append(True)
            return None
        if held.get("state") == "held" and is_live(held):
            return held
        if reclaim and held.get("run_id") not in (spec.run_id, None):
            return dict(held, superseded=True)
        try:
            # the document replaced goes into the lock too: a retry of this task that finds the lock its own and
            # nothing to mask there gives it back as it was (naming the run that masked the day), not bare
            _store(client, settings).put_json_conditional(
                key, dict(mine, replaced={k: v for k, v in held.items() if k != "replaced"}), if_match=etag)
            if previous is not None:
                previous.append(held)
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_CODES or error_code(exc) in MISSING_CODES:
                continue  # another run took it in between: look again
            raise
        log(f"{spec.region} {spec.window.id}: lock taken by run {spec.run_id} "
            f"(it was {held.get('state', 'unreadable')}" + (f" by run {held['run_id']}, no longer running)" if held.get("run_id") else ")"))
        return None
    raise RuntimeError(f"could not take or read the lock s3://{settings.bucket}/{key}: it changed 10 times in a row")


def release_lock(client, settings: Settings, spec: RunSpec, log: Callable[[str], None] = print) -> bool:
    """Mark this run's locks of the window's days, and of the days before it whose late photos it picked
    up, released (a lock of another run is left alone); whether it held any."""
    keys = lock_keys(settings, spec)
    late = [k for k in (_day_lock_key(settings, spec.region, d) for d in late_days(settings, spec)) if k not in keys]
    released = [_release_one(client, settings, spec, key, log) for key in keys]
    if late:
        # a late day's lock that collect did not keep (it failed for good while it looked there) goes back as it
        # was, with who looked: released in this run's name it would read as a run that had the day since
        kept = _kept_late_locks(client, settings, spec)
        for key in late:
            if key in kept:
                released.append(_release_one(client, settings, spec, key, log))
            elif (found := _own_lock(client, settings, spec, key)) is not None:
                before = found[0].get("replaced")
                _give_back_unused(client, settings, spec, key, before if isinstance(before, dict) else None, log)
                released.append(True)
    return any(released)


def _kept_late_locks(client, settings: Settings, spec: RunSpec) -> frozenset:
    """The late days' locks this run's collect kept (its collected.json; none before collect ran)."""
    return frozenset((load_collected(client, settings, spec) or {}).get("late_locks", []))


def _give_back_unused(client, settings: Settings, spec: RunSpec, key: str, before: dict | None,
                      log: Callable[[str], None]) -> None:
    """Give back a late day's lock this run took only to look and found nothing to mask there: the document
    it replaced goes back (none: a released lock naming no run), with who looked, so the lock still names
    the last run that masked that day. A cleared task of that run may take it again (``reclaim``): a look
    that took nothing is no run that has had the day."""
    doc = dict(before) if isinstance(before, dict) and before else {"state": "released"}
    doc["looked"] = {"run_id": spec.run_id, "at": datetime.now(timezone.utc).isoformat(), "took": 0}
    if _rewrite_own_lock(client, settings, spec, key, lambda mine: doc):
        log(f"{spec.region} {spec.window.id}: lock {key.rsplit('/', 1)[-1]} given back by run {spec.run_id} "
            "(no late photo there), " + (f"{doc.get('state')}, naming run {doc['run_id']} again" if doc.get("run_id")
                                         else "released (no run had it before)"))


def _own_lock(client, settings: Settings, spec: RunSpec, key: str) -> tuple[dict, str] | None:
    """(document, ETag) of the lock at ``key`` when this run holds it, else None (free, released,
    another run's, missing or unreadable)."""
    try:
        found = _store(client, settings).get_json(key)
    except ValueError:
        return None
    if found is None or found[0].get("state") != "held" or found[0].get("run_id") != spec.run_id:
        return None
    return found


def _rewrite_own_lock(client, settings: Settings, spec: RunSpec, key: str, doc: Callable[[dict], dict]) -> bool:
    """Replace the lock at ``key`` with ``doc(its document)`` if this run holds it (a conditional write on
    its ETag); whether it did (False: not this run's, or taken over meanwhile, this run thought dead)."""
    from botocore.exceptions import ClientError

    found = _own_lock(client, settings, spec, key)
    if found is None:
        return False
    try:
        _store(client, settings).put_json_conditional(key, doc(found[0]), if_match=found[1])
    except ClientError as exc:
        if error_code(exc) in PRECONDITION_CODES:
            return False  # taken over meanwhile (this run was thought dead): not ours any more
        raise
    return True


def _release_one(client, settings: Settings, spec: RunSpec, key: str, log: Callable[[str], None]) -> bool:
    released = _rewrite_own_lock(client, settings, spec, key, lambda mine: dict(
        mine, state="released", released=datetime.now(timezone.utc).isoformat()))
    if released:
        log(f"{spec.region} {spec.window.id}: lock {key.rsplit('/', 1)[-1]} released by run {spec.run_id}")
    return released


# ---------------------------------------------------------------- collect

MAX_SKIPPED_LISTED = 100  # hidden files named in collected.json and the QA report (all are counted)


ARCHIVED_CLASSES = ("GLACIER", "DEEP_ARCHIVE")  # storage classes a GET refuses (InvalidObjectState) until restored


def _listed(obj: dict, **extra) -> dict:
    """A manifest entry for a listed object: key, size, ETag, whether its extension is supported, and
    its storage class when it is an archived one (read only once restored)."""
    sc = obj.get("StorageClass")
    return {"key": obj["Key"], "size": int(obj["Size"]), "etag": obj["ETag"].strip('"'),
            "supported": extension_supported(obj["Key"]), **({"storage_class": sc} if sc in ARCHIVED_CLASSES else {}),
            **extra}


def archived_error(uri: str, storage_class: str) -> str:
    return (f"{uri} is in the {storage_class} storage class and not restored: S3 refuses to read it "
            "(InvalidObjectState); restore it (S3 RestoreObject, or the console's 'Initiate restore') and rerun "
            "this window; not masked, nothing published")


def _is_folder_marker(obj: dict) -> bool:
    """An empty object whose key ends in '/': what consoles create for a folder, not a photo."""
    return obj["Key"].endswith("/") and int(obj.get("Size", 0)) == 0


def day_prefix(settings: Settings, region: str, d: date) -> str:
    """The raw day partition of ``region``'s local day ``d`` (``raw_prefix``): what collect lists for a day of
    the window, and late pick-up for a day before it."""
    return settings.raw_prefix.format(region=region, yyyy=f"{d.year:04d}", mm=f"{d.month:02d}", dd=f"{d.day:02d}")


# failures the upload itself causes (its bytes, its size or its key): the same upload fails the same
# way again, so late pick-up leaves them to a new upload. Any other failure (reading or writing S3, a
# transform job, the detector, an archived photo since restored) is retried by the next nights.
UPLOAD_FAULTS = DECODE_FAULTS | frozenset({
    "payload_too_large", "unsupported_media_type", "key_too_long", "unsafe_key", "output_collision"})


def late_days(settings: Settings, spec: RunSpec) -> list[date]:
    """The ``late_days`` local days before the first day the window's collect lists, oldest first: the days
    whose late photos a run of ``spec`` picks up."""
    w, tz = spec.window, settings.region_timezones[spec.region]
    days = w.partition_days(tz) if settings.time_source == "partition" else w.days(tz)
    first = (days or w.days(tz))[0]
    return [first - timedelta(days=i) for i in range(settings.late_days, 0, -1)]


def _night(settings: Settings, region: str, d: date) -> RunSpec:
    """A run of ``region``'s local day ``d``: the nightly window of that day."""
    z = ZoneInfo(settings.region_timezones[region])
    e = d + timedelta(days=1)
    return RunSpec(region=region, window_start=datetime(d.year, d.month, d.day, tzinfo=z).isoformat(),
                   window_end=datetime(e.year, e.month, e.day, tzinfo=z).isoformat())


def _day_lock_key(settings: Settings, region: str, d: date) -> str:
    """The lock of ``region``'s local day ``d`` (the one a nightly run of that day holds)."""
    (key,) = lock_keys(settings, _night(settings, region, d))
    return key


def _day_was_collected(client, settings: Settings, region: str, d: date) -> bool:
    """Whether a run of its own has collected ``region``'s day ``d``: its marker (``day_collected_key``), or,
    for a day masked before collect wrote markers, the latest QA report of its nightly window."""
    store = _store(client, settings)
    return store.exists(day_collected_key(settings, region, d)) or \
        store.exists(qa_prefix(settings, _night(settings, region, d)) + "report.json")


def day_collected_key(settings: Settings, region: str, d: date) -> str:
    """The marker that a run whose own window covers ``region``'s local day ``d`` has collected it
    (``runs/{region}/days/{yyyy-mm-dd}.json``, beside the day locks): until it exists, the day's photos are
    its own run's to mask, not the next nights' late photos."""
    return _day_lock_key(settings, region, d).rsplit("/locks/", 1)[0] + f"/days/{d.isoformat()}.json"


def _whole_days(settings: Settings, spec: RunSpec) -> list[date]:
    """The local days all of whose photos are the window's: with time_source ``partition`` the day partitions
    it lists, with ``last_modified`` the days it covers from midnight to midnight."""
    w, tz = spec.window, settings.region_timezones[spec.region]
    if settings.time_source == "partition":
        return w.partition_days(tz)
    z = ZoneInfo(tz)
    return [d for d in w.days(tz) if w.start <= datetime(d.year, d.month, d.day, tzinfo=z)
            and datetime.combine(d + timedelta(days=1), datetime.min.time(), tzinfo=z) <= w.end]


def _late_entries(client, settings: Settings, spec: RunSpec, log: Callable[[str], None],
                  hidden: list[str] | None = None, is_live: Callable[[dict], bool] | None = None,
                  owner: dict | None = None, locks: list[str] | None = None,
                  not_collected: list[str] | None = None,
                  day_pending: Callable[[date], bool] | None = None, had: frozenset = frozenset()) -> list[dict]:
    """Photos of the ``late_days`` day partitions before the window that have no audit record (uploaded
    after their night's run, or missed by it), or whose audit record is of another upload (its
    ``source_etag`` is not the photo's ETag now: re-uploaded after its night's run, or during it,
    when that run's record says ``source_changed``), or whose record says it failed for a reason
    other than the upload itself (``UPLOAD_FAULTS``: a read cut short, a failed transform job; that
    night was green within its failure limit, and nothing else would ever mask it); an audit record
    that cannot be read counts as none.

    A run picks up a day's late photos holding that day's lock (taken here, without waiting; ``release``
    gives it back with the window's): a run of that day (a backfill's, a rerun) waits meanwhile, instead of
    taking the free lock and masking the same photos beside it. A day whose lock another run holds is left
    to it, unless ``is_live`` (the lock's test) says that run is no longer running: a lock left held by a
    run that ended without releasing it (its release task failed for good or never ran) would otherwise keep
    that day's late photos out of every later night, with no record. A dry run takes no lock: it only looks.
    A day with no late photo is given back at once; the locks of the days that had some are added to ``locks``
    (the mask step takes them again when cleared after the run ended: ``acquire_late_locks``).

    Only a day that a run of its own has collected (``day_collected_key``, or for a day masked before collect
    wrote markers, its nightly window's latest QA report) has late photos: in a backfill the
    next day's run may get there before that day's run has reached ``hold``, and would otherwise mask the
    whole day as its "late" photos, leaving that day's run nothing to do and its QA nothing to say. Such a day
    is left to its own run, named in the log and in ``not_collected`` (the QA report's
    ``late_days_not_collected``), while a run of it is queued or running (``day_pending(d)``: Airflow
    creates a backfill's runs up front) or a later night's late pick-up can still reach it. On the last
    night that reaches it (the oldest of the late days) a day no run has collected and none is about to
    is picked up as late all the same: a night missed with catchup off is masked ``late_days`` nights
    later, never left unmasked without a record."""
    out = []
    own = lock_keys(settings, spec)
    days = late_days(settings, spec)
    for d in days:
        key = _day_lock_key(settings, spec.region, d)
        if not _day_was_collected(client, settings, spec.region, d):
            marker = (f"no s3://{settings.bucket}/{day_collected_key(settings, spec.region, d)}, no latest QA report "
                      "of its night")
            pending = day_pending is not None and day_pending(d)
            if pending or d != days[0]:
                log(f"{spec.region} {d}: no run of that day has collected it yet ({marker}): its photos are left to "
                    + ("that day's run, which is queued or running" if pending else
                       "that day's own run, not picked up as late yet; if no run of that day comes (a night missed "
                       "with catchup off), the late pick-up of the night that ends its late days takes them, or "
                       "backfill it"))
                if not_collected is not None:
                    not_collected.append(d.isoformat())
                continue
            log(f"{spec.region} {d}: no run of that day has collected it ({marker}) and none is queued or running; "
                "this is the last night whose late pick-up reaches it: its photos without a record are picked up as late")
        if spec.dry_run:
            try:
                lock = _store(client, settings).get_json(key)
            except ValueError:
                lock = None
            holder = lock[0] if lock and lock[0].get("state") == "held" and lock[0].get("run_id") != spec.run_id \
                and (is_live is None or is_live(lock[0])) else None
        else:
            before: list = []
            reentered: list = []
            holder = _acquire_one(client, settings, spec, key, is_live=is_live or (lambda held: True), log=log,
                                  owner=owner, previous=before, reentered=reentered)
        if holder is not None:
            log(f"{spec.region} {d}: late photos left to run {holder.get('run_id')}, which holds that day")
            continue
        prefix = day_prefix(settings, spec.region, d)
        audit_prefix = audit_key(settings, spec.region, prefix)[: -len(".json")]
        audited = {o["Key"] for o in _store(client, settings).iter_objects(audit_prefix)}
        photos = []
        for o in _store(client, settings).iter_objects(prefix):
            if _is_folder_marker(o):
                continue
            if is_hidden(o["Key"]):
                if hidden is not None:
                    hidden.append(o["Key"])
                continue
            photos.append(_listed(o, late=True))
        late = [e for e in photos if audit_key(settings, spec.region, e["key"]) not in audited]
        recorded = [e for e in photos if audit_key(settings, spec.region, e["key"]) in audited]
        with ThreadPoolExecutor(max(1, settings.io_workers)) as pool:
            audits = list(pool.map(lambda e: read_audit(client, settings, audit_key(settings, spec.region, e["key"]), log),
                                   recorded))
        changed = [e for e, a in zip(recorded, audits) if (a or {}).get("source_etag") != e["etag"]]
        retried = [e for e, a in zip(recorded, audits) if a and a.get("source_etag") == e["etag"]
                   and a.get("status") == "failed" and a.get("reason") not in UPLOAD_FAULTS]
        if late or changed or retried:
            log(f"{spec.region} {d}: {len(late)} late photo(s) without an audit record"
                + (f", {len(changed)} re-uploaded since theirs" if changed else "")
                + (f", {len(retried)} whose last try failed for a reason other than the upload itself, tried again"
                   if retried else "")
                + f" under s3://{settings.bucket}/{prefix}")
        out += sorted(late + changed + retried, key=lambda e: e["key"])
        if not spec.dry_run and key not in own:
            # ``had``: an earlier try of this run's collect kept the lock (its late photos are this run's work since,
            # so nothing is late there now) and no other run has had it since: this run still had the day last
            last = reentered or (before and isinstance(before[0], dict) and before[0].get("run_id") == spec.run_id)
            if late or changed or retried or (key in had and last):
                if locks is not None:
                    locks.append(key)
            else:
                # nothing to do there: no run of it waits for this one, and the lock still names the run that masked it
                _give_back_unused(client, settings, spec, key, before[0] if before else None, log)
    return out


def acquire_late_locks(client, settings: Settings, spec: RunSpec, *, is_live: Callable[[dict], bool],
                       log: Callable[[str], None] = print, owner: dict | None = None,
                       reclaim: bool = False) -> dict | None:
    """Take again the locks of the days before the window whose late photos this run's collect picked up
    (``late_locks`` in collected.json), as ``acquire_lock`` does the window's (``reclaim`` too): None, or the
    lock document of the live run that holds one (a mask task cleared after the run ended must not mask them
    beside it), or of the run that has had it since (``superseded``)."""
    c = load_collected(client, settings, spec)
    for key in (c or {}).get("late_locks", []):
        held = _acquire_one(client, settings, spec, key, is_live=is_live, log=log, owner=owner, reclaim=reclaim)
        if held is not None:
            return held
    return None


def collect(client, settings: Settings, spec: RunSpec, log: Callable[[str], None] = print, *,
            is_live: Callable[[dict], bool] | None = None, owner: dict | None = None,
            day_pending: Callable[[date], bool] | None = None) -> dict:
    """List only the partitions the window covers, keep supported images in it, add the late photos of
    the days before (``late_days``, under their day locks; ``is_live(lock)``: whether the run holding such
    a day's lock is still running, see ``_late_entries``; ``owner`` is stored in a lock taken), write the
    manifest; then, unless a dry run or cut by ``max_images``, mark the window's whole days collected
    (``day_collected_key``): from then on their photos without a record are the next nights' late photos."""
    w = spec.window
    tz = settings.region_timezones[spec.region]
    days = w.partition_days(tz) if settings.time_source == "partition" else w.days(tz)
    z = ZoneInfo(tz)
    entries = []
    hidden: list[str] = []
    late_locks: list[str] = []
    not_collected: list[str] = []
    store = _store(client, settings)
    for d in days:
        prefix = day_prefix(settings, spec.region, d)
        n_listed = 0
        midnight = datetime(d.year, d.month, d.day, tzinfo=z)
        last_instant = datetime.combine(d + timedelta(days=1), datetime.min.time(), tzinfo=z) - timedelta(microseconds=1)
        for obj in store.iter_objects(prefix):
            n_listed += 1
            key = obj["Key"]
            if _is_folder_marker(obj):
                continue
            if settings.time_source == "last_modified":
                # A photo belongs to the window that holds its upload time clamped into its partition's
                # day: one uploaded after that day (late) to the window holding the day's last instant,
                # the last to list the partition; one uploaded before it (ahead, into a later day's
                # partition) to the window holding its midnight, the first. So each photo has one
                # window, and the one that runs latest after its upload
                if not w.contains(min(max(obj["LastModified"], midnight), last_instant)):
                    continue
            if is_hidden(key):
                hidden.append(key)
                continue
            # a non-empty object whose key ends in '/' stays in: an input gets a record (what it holds decides)
            entries.append(_listed(obj))
        log(f"{spec.region}: listed {n_listed} objects under s3://{settings.bucket}/{prefix}")
    in_window = len(entries)
    if settings.late_days:
        # the late days' locks an earlier try of this run's collect kept (a run cleared after it masked them)
        had = _kept_late_locks(client, settings, spec) if not spec.dry_run else frozenset()
        entries += _late_entries(client, settings, spec, log, hidden, is_live, owner, late_locks, not_collected,
                                 day_pending, had)
    entries.sort(key=lambda e: e["key"])
    skipped_ext = [e["key"] for e in entries if not e["supported"]]
    # other extensions stay in the manifest: what an object holds decides, not its name (a photo named
    # IMG_1234 or x.exe is masked and published under its key; anything else fails with its reason)
    n_all = len(entries)
    if spec.max_images:
        entries = entries[: spec.max_images]
    key = run_prefix(settings, spec) + "manifest.jsonl"
    uri = _store(client, settings).put_json(key, entries, lines=True)
    log(f"{spec.region} window {w.id}: {len(entries)} photos in {len(days)} partition(s) -> {uri}"
        + (f" ({len(skipped_ext)} whose extension is not a photo's: masked if they hold one, else failed)"
           if skipped_ext else "")
        + (f" (max_images: {len(entries)} of {n_all})" if len(entries) < n_all else ""))
    if hidden:
        log(f"{spec.region} window {w.id}: {len(hidden)} hidden file(s) skipped (names starting with '.'; no record, "
            f"not masked, named in the QA report): {', '.join(repr(k) for k in hidden[:5])}{' ...' if len(hidden) > 5 else ''}; "
            "rename one to mask it")
    collected = {"spec": spec.as_dict(), "manifest": uri, "count": len(entries), "photos_in_window": in_window,
                 "late_locks": late_locks, "late_days_not_collected": not_collected,
                 "late": sum(bool(e.get("late")) for e in entries), "listed": n_all,
                 "skipped_hidden": {"count": len(hidden), "keys": sorted(hidden)[:MAX_SKIPPED_LISTED]}}
    _store(client, settings).put_json(run_prefix(settings, spec) + "collected.json", collected)  # last: present = collected
    if not spec.dry_run and len(entries) == n_all:  # (a max_images run leaves photos of its days to a whole run)
        for d in _whole_days(settings, spec):  # its photos from now on are late photos of the next nights
            _store(client, settings).put_json(day_collected_key(settings, spec.region, d), {
                "region": spec.region, "day": d.isoformat(), "run_id": spec.run_id, "run_key": spec.run_key,
                "window": spec.window.id, "manifest": uri, "collected_at": datetime.now(timezone.utc).isoformat(),
                **(owner or {})})
    return collected


def load_collected(client, settings: Settings, spec: RunSpec) -> dict | None:
    """What this run's collect found for the region, or None when its collect did not finish."""
    found = _store(client, settings).get_json(run_prefix(settings, spec) + "collected.json")
    return None if found is None else found[0]


SHARDED = "sharded.json"  # under a run's folder: the number of shards make_shards cut its manifest into


def make_shards(client, settings: Settings, specs: list[dict], log: Callable[[str], None] = print) -> list[dict]:
    """Cut each collected region's manifest into shards; the total stays under ``max_shards``
    (Airflow maps < 1024). A region whose collect failed is left out (QA reports it, the run fails);
    the other regions are still masked."""
    collected = []
    for d in specs:
        c = load_collected(client, settings, RunSpec.from_dict(d))
        if c is None:
            log(f"{d['region']}: not collected (its collect task failed); its photos are not sharded")
        else:
            collected.append(c)
    total = sum(c["count"] for c in collected)
    sagemaker = any(c["spec"]["backend"] == "sagemaker" for c in collected)
    base = settings.sagemaker_shard_size if sagemaker else settings.shard_size  # a shard is one transform job
    size = max(base, math.ceil(total / settings.max_shards)) if total else base
    shards = []
    for c in collected:
        spec = RunSpec.from_dict(c["spec"])
        entries = read_json_lines(client, c["manifest"]) if c["count"] else []
        for i in range(0, len(entries), size):
            key = run_prefix(settings, spec) + f"shards/{i // size:04d}.jsonl"
            uri = _store(client, settings).put_json(key, entries[i: i + size], lines=True)
            shards.append({"spec": c["spec"], "shard": uri, "index": i // size, "count": len(entries[i: i + size])})
        # how many shards this cut has: a cleared run cut into fewer leaves its first try's higher ones behind
        _store(client, settings).put_json(run_prefix(settings, spec) + SHARDED,
                                          {"shards": math.ceil(len(entries) / size), "size": size})
    log(f"{total} photos in {len(shards)} shard(s) of up to {size}")
    return shards


# ---------------------------------------------------------------- mask one shard

def code_version() -> str:
    """The installed platemask version: part of a result's identity (new masking code redoes photos)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("platemask")
    except PackageNotFoundError:
        return "0+unknown"


def model_config_sha256(cfg: Any) -> str:
    """Digest of the model configuration that changes what is masked: everything in config.json but
    its name, training provenance (``extra``) and the review band (which only flags photos). The
    operating threshold is in it too, and the threshold actually applied is also recorded on its own."""
    d = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
    for k in ("name", "extra", "review_low", "review_high", "review_max_masks", "review_max_masked_fraction"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def result_identity(*, etag: str, model_info: dict, cfg: Any, threshold: float, mode: str, metadata: str) -> dict:
    """Everything that changes a photo's masked copy. A rerun skips a photo only when its audit record
    holds the same identity; the source's SHA-256 is recorded beside it (``input_sha256``): the
    ETag, which changes whenever the object is rewritten, is what can be checked without reading it."""
    return {"source_etag": etag, "weights_sha256": model_info.get("weights_sha256"),
            "verifier_sha256": model_info.get("verifier_sha256"), "model_config_sha256": model_config_sha256(cfg),
            "threshold": float(threshold), "mode": mode, "metadata": metadata, "code_version": code_version()}


def photo_identities(spec: RunSpec, entries: list[dict], model_info: dict, cfg: Any,
                     metadata: str = DEFAULT_METADATA_POLICY) -> dict[str, dict]:
    """Each manifest entry's result identity for this run (the threshold applied is the run's, else
    the model's operating threshold): the one rule both the mask step and SageMaker's submit use."""
    threshold = cfg.score_threshold if spec.threshold is None else spec.threshold
    return {e["key"]: result_identity(etag=e["etag"], model_info=model_info, cfg=cfg, threshold=threshold,
                                      mode=spec.mode, metadata=metadata) for e in entries}


def read_audit(client, settings: Settings, key: str, log: Callable[[str], None] = print) -> dict | None:
    """The photo's audit record, or None when there is none or it cannot be read (the photo is then
    redone: idempotent, and better than trusting what cannot be checked)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = _store(client, settings).read(key)
    except ClientError as exc:
        if error_code(exc) not in MISSING_CODES:
            log(f"cannot read audit record s3://{settings.bucket}/{key} ({error_code(exc)}): the photo is redone")
        return None
    except BotoCoreError as exc:
        log(f"cannot read audit record s3://{settings.bucket}/{key} ({exc}): the photo is redone")
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None  # a broken audit record is redone, not trusted


def already_done(client, settings: Settings, spec: RunSpec, entry: dict, audit: dict | None, identity: dict) -> bool:
    """Skip a photo only when its audit record holds exactly this result identity and its masked copy
    is the one the record describes (the SHA-256 stored with it is the record's ``output_sha256``):
    a copy another run replaced, or one written without its hash, is redone."""
    from botocore.exceptions import BotoCoreError, ClientError

    if audit is None or audit.get("status") == "failed" or audit.get("identity") != identity:
        return False
    try:
        stored = _store(client, settings).sha256(masked_key(settings, spec.region, entry["key"]))
    except (ClientError, BotoCoreError):
        return False  # cannot tell: redo it
    return stored is not None and stored == audit.get("output_sha256")


def _unpublish(client, settings: Settings, key: str, log: Callable[[str], None]) -> bool:
    """Remove a masked copy whose audit record could not be written; False when that fails too."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _store(client, settings).delete(key)
        return True
    except (ClientError, BotoCoreError) as exc:
        log(f"cannot remove s3://{settings.bucket}/{key}, which has no audit record: {exc}")
        return False


class ManifestSource:
    """The originals exactly as the manifest listed them (fail closed on any change).

    Every read is pinned to the listed ETag (S3 ``IfMatch``): a photo re-uploaded since it was
    listed is not read at all. Where the detection was made elsewhere (SageMaker's ``.out``
    records carry the SHA-256 of the bytes the container saw), the bytes read must have that
    hash too. Either way a mismatch is ``ImageError("source_changed")``: the photo's record is
    ``failed``, nothing is published, and the next run (which lists the new ETag) picks it up.
    """

    def __init__(self, store: S3Store, etags: dict[str, str], expected_sha256: dict[str, str] | None = None,
                 sizes: dict[str, int] | None = None, storage_classes: dict[str, str] | None = None):
        self.store, self.etags, self.expected = store, etags, expected_sha256 or {}
        self.sizes = sizes or {}
        self.storage_classes = storage_classes or {}  # key -> archived storage class, as listed
        self.uri = store.uri

    def size(self, key: str) -> int:
        """The size the manifest listed (the only version ``read`` returns, pinned to its ETag): the job
        refuses an object larger than any photo can be unread (``too_large``: a video is not read whole
        into the worker). ValueError when the manifest gave none."""
        if key not in self.sizes:
            raise ValueError(f"no listed size for {key!r}")
        return int(self.sizes[key])

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        etag = self.etags[key]
        try:
            data = self.store.read(key, if_match=f'"{etag}"')
        except ClientError as exc:
            if error_code(exc) == "InvalidObjectState":  # archived (Glacier, Deep Archive), not restored
                raise ImageError("archived", archived_error(self.describe(key),
                                                            self.storage_classes.get(key, "an archive"))) from None
            if error_code(exc) not in IF_MATCH_FAILED_CODES:
                raise
            raise ImageError("source_changed", f"{self.describe(key)} changed since it was listed (ETag {etag} "
                             "no longer matches): not masked; a rerun of this window, or the next nights' late "
                             "pick-up (late_days), masks the new upload") from None
        want = self.expected.get(key)
        if want and hashlib.sha256(data).hexdigest() != want:
            raise ImageError("source_changed", f"{self.describe(key)}: the bytes read (ETag {etag}) are not the bytes "
                             "the detector saw (input_sha256 differs): not masking with another photo's polygons; "
                             "a rerun of this window, or the next nights' late pick-up (late_days), masks it")
        return data

    def describe(self, key: str) -> str:
        return self.store.describe(key)


def mask_shard(client, settings: Settings, shard: dict, detector_factory: Callable, *,
               log: Callable[[str], None] = print) -> dict:
    """Mask one shard: skip photos whose result identity is unchanged, do the rest, one record each.

    ``detector_factory(spec, entries) -> (detect, model_info, cfg)`` builds the backend's detector
    (the local model, or SageMaker's .out files) once per shard. Originals are read through
    ``ManifestSource`` (pinned to the manifest's ETags; a detector that knows the hashes of the
    bytes it detected on exposes them as ``detect.expected_sha256``). A problem with one photo
    (read, source changed, decode, detect, mask, encode, write, key too long, audit write) fails
    that photo only, with its reason; the shard goes on.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from .detections import record
    from .mask import MaskStyle
    from .pipeline import JobOptions, Progress, Timings, run_job

    spec = RunSpec.from_dict(shard["spec"])
    entries = read_json_lines(client, shard["shard"])
    detect, model_info, cfg = detector_factory(spec, entries, shard)
    threshold = cfg.score_threshold if spec.threshold is None else spec.threshold
    # where the detector runs (settings.device may say "auto"; a transform job's detections come from S3: CPU)
    device = getattr(detect, "device", "cpu")
    # a photo that fails now loses the masked copy an earlier run made of it (its original changed or
    # broke since): the masked prefix never holds a copy whose audit record says failed
    opts = JobOptions.for_model(cfg, threshold, style=MaskStyle(mode=spec.mode), batch_size=settings.batch_size,
                                remove_stale_outputs=True,
                                **JobOptions.for_device(device, settings.io_workers, settings.batch_size))
    etags = {e["key"]: e["etag"] for e in entries}
    identity = photo_identities(spec, entries, model_info, cfg, opts.metadata)
    too_long = {e["key"]: why for e in entries if (why := key_too_long(settings, spec.region, e["key"]))}
    fits = [e for e in entries if e["key"] not in too_long]
    with ThreadPoolExecutor(settings.io_workers) as pool:
        audits = list(pool.map(lambda e: read_audit(client, settings, audit_key(settings, spec.region, e["key"]), log), fits))
        done = [False] * len(fits)
        if not spec.reprocess:
            done = list(pool.map(lambda ea: already_done(client, settings, spec, ea[0], ea[1], identity[ea[0]["key"]]),
                                 zip(fits, audits)))
    todo = [e for e, d in zip(fits, done) if not d]
    # a photo an earlier attempt of this task finished (retried after its worker was lost) was processed
    # by this run: only what another run masked is "skipped, already masked"
    records: list[dict] = [dict(a, skipped=True) if a.get("run_id") != spec.run_id else dict(a, earlier_attempt=True)
                           for a, d in zip(audits, done) if d]
    by_earlier_attempt = sum(bool(r.get("earlier_attempt")) for r in records)
    log(f"shard {shard['shard']}: {len(entries)} photos, {len(records)} already done with the same result identity, "
        f"{len(todo)} to do" + (f", {len(too_long)} with keys too long for S3" if too_long else ""))
    store = _store(client, settings)
    timings = Timings()
    t0 = time.perf_counter()

    def stamp(rec: dict) -> dict:
        rec.update(source_etag=etags[rec["key"]], identity=identity[rec["key"]], run_id=spec.run_id,
                   window=spec.window.id, mode=spec.mode, threshold=threshold, threshold_param=spec.threshold,
                   backend=spec.backend, processed_at=datetime.now(timezone.utc).isoformat(),
                   masked_key=masked_key(settings, spec.region, rec["key"]) if rec["status"] != "failed" else None)
        return rec

    if spec.dry_run:
        log(f"dry run: would mask {len(todo)} photos; nothing written")
        new = []
    else:
        def write_audit(rec: dict):
            stamp(rec)
            akey = audit_key(settings, spec.region, rec["key"])
            try:
                store.write(akey, json.dumps(rec, sort_keys=True).encode(), "application/json")
            except (ClientError, BotoCoreError) as exc:
                # the photo fails alone, and is not published without its record: its masked copy goes
                written = rec["masked_key"]
                left = written if written and not _unpublish(client, settings, written, log) else None
                rec.update(status="failed", reason="audit_write_failed", masked_key=None, unaudited_masked_copy=left,
                           error=f"cannot write the audit record s3://{settings.bucket}/{akey}: {exc}"
                                 + (f"; its masked copy s3://{settings.bucket}/{written} was removed (never published "
                                    "without its record); rerun the window to redo it" if written and not left else "")
                                 + (f"; the masked copy s3://{settings.bucket}/{left} was written before this failure "
                                    "and could not be removed: it has no audit record (delete it, or rerun the "
                                    "window to redo it)" if left else ""))
                log(f"{rec['key']}: {rec['error']}")

        source = ManifestSource(store, etags, getattr(detect, "expected_sha256", None),
                                {e["key"]: e["size"] for e in entries if isinstance(e.get("size"), int)},
                                {e["key"]: e["storage_class"] for e in entries if e.get("storage_class")})
        new = [stamp(record(k, status="failed", reason="key_too_long", error=why)) for k, why in too_long.items()]
        new += run_job(source, store, [e["key"] for e in todo], detect, opts, model=model_info, timings=timings,
                       on_record=write_audit, progress=Progress(len(todo), every=10.0, emit=log),
                       dst_key=lambda k: masked_key(settings, spec.region, k))
    wall = time.perf_counter() - t0
    records.extend(new)
    order = {e["key"]: i for i, e in enumerate(entries)}
    records.sort(key=lambda r: order.get(r["key"], 0))
    base = run_prefix(settings, spec) + f"detections/{shard['index']:04d}"
    det_uri = _store(client, settings).put_json(base + ".jsonl", records, lines=True)
    summary = {"shard": shard["shard"], "index": shard["index"], "photos": len(entries),
               "processed": len(new) + by_earlier_attempt,
               "skipped": len(entries) - len(todo) - len(too_long) - by_earlier_attempt, "wall_seconds": round(wall, 3),
               "images_per_second": round(len(new) / wall, 3) if new and wall > 0 else None,
               "timings_s": {k: round(v, 3) for k, v in timings.as_dict().items()}, "model": model_info,
               "failed": sum(r["status"] == "failed" for r in new), "dry_run": spec.dry_run, "threshold": threshold,
               "run_id": spec.run_id, "backend": spec.backend, "transform": shard.get("transform"),
               "would_process": len(todo) if spec.dry_run else 0}
    sum_uri = _store(client, settings).put_json(base + ".summary.json", summary)
    log(f"shard {shard['index']}: {summary['processed']} processed ({summary['failed']} failed), "
        f"{summary['skipped']} skipped, {summary['images_per_second'] or 0:.2f} images/s")
    return {"spec": shard["spec"], "detections": det_uri, "summary": sum_uri, **{k: summary[k] for k in ("photos", "processed", "skipped", "failed")}}


# ---------------------------------------------------------------- QA

def _run_shard_results(client, settings: Settings, spec: RunSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """Records and summaries this run wrote for the region's window (its own run-keyed folder), and the
    records of shards its current cut no longer has (``SHARDED``: a run cleared and cut into fewer shards,
    after a photo left raw/ or shard_size was raised, leaves its first try's higher shards behind)."""
    store = _store(client, settings)
    keys = [o["Key"] for o in store.iter_objects(run_prefix(settings, spec) + "detections/")]
    try:
        found = store.get_json(run_prefix(settings, spec) + SHARDED)
    except ValueError:
        found = None  # unreadable: every shard counts, as before the cut was recorded
    cut = found[0].get("shards") if found and isinstance(found[0], dict) else None
    records, summaries, stale = [], [], []
    for key in sorted(k for k in keys if k.endswith(".summary.json")):
        summary = json.loads(store.read(key))
        if summary.get("run_id") != spec.run_id:
            continue
        recs = read_json_lines(client, s3_uri(settings, key[: -len(".summary.json")] + ".jsonl"))
        if cut is not None and summary.get("index", 0) >= cut:
            stale.extend(recs)
            continue
        summaries.append(summary)
        records.extend(recs)
    return records, summaries, stale


def verdict(report: dict) -> list[str]:
    """What keeps a region's run from being trusted (pure); empty when its QA passed."""
    problems = []
    if not report.get("collected", True):
        if report.get("lock_held") is False and not report.get("dry_run"):
            problems.append("not collected: this run never held the region's day locks (its hold task failed: "
                            "another run is masking these days, named in hold's log, or the locks could not be "
                            "taken); nothing was masked; rerun the window once that run has finished")
        else:
            problems.append("not collected: its collect task failed (see the task log); nothing was masked")
        return problems
    if report.get("not_accounted_for"):
        problems.append(f"{report['not_accounted_for']} photo(s) of the manifest have no record: their shard's masking "
                        "task failed for good (counted as failed, reason shard_failed); rerun the window")
    if report.get("duplicate_records"):
        problems.append(f"{report['duplicate_records']} photo(s) have more than one record")
    if report.get("records_outside_manifest"):
        problems.append(f"{report['records_outside_manifest']} record(s) are for photos not in the manifest")
    images, failed = report.get("images") or 0, (report.get("by_status") or {}).get("failed", 0)
    if images and failed == images and not report.get("dry_run"):
        # max_failure_rate may be set to 1 (a Param): a window none of whose photos was masked or found plate-free
        # is never a passed QA, whatever the limit says
        problems.append(f"every one of the {images} photo(s) failed: none was masked or found without a plate, so "
                        f"this window's QA does not pass whatever max_failure_rate says (it is "
                        f"{report['max_failure_rate']:.1%}); see the failed photos and their reasons, fix what they "
                        "name, then rerun the window")
    elif report["failure_rate"] > report["max_failure_rate"]:
        problems.append(f"failure rate {report['failure_rate']:.1%} exceeds {report['max_failure_rate']:.1%}")
    return problems


def _holds_lock(client, settings: Settings, spec: RunSpec) -> bool:
    """Whether this run holds the lock of every day its window touches."""
    return all(_own_lock(client, settings, spec, key) is not None for key in lock_keys(settings, spec))


def aggregate(client, settings: Settings, specs: list[dict], *, run_id: str,
              log: Callable[[str], None] = print) -> list[dict]:
    """Per planned region: merge this run's shard records into its QA report (report.json and
    report.html under qa/{region}/{window}/runs/{run}/), then, for a run that holds the region-window's
    lock and is not a dry run, copy them to qa/{region}/{window}/ (the latest report).

    Photos of the manifest without a record (their shard's task failed for good) count as failed
    with reason ``shard_failed``; a region whose collect failed gets a report that says so.
    """
    from .detections import record
    from . import qa
    from .qa import build_report, headline
    from .report_html import render_report

    out = []
    for d in specs:
        spec = RunSpec.from_dict(d)
        c = load_collected(client, settings, spec)
        records, summaries, stale = _run_shard_results(client, settings, spec) if c else ([], [], [])
        manifest = read_json_lines(client, c["manifest"]) if c and not spec.dry_run else []
        planned = {e["key"] for e in manifest}
        # a shard of an earlier cut: its photos still planned are in a current shard (recorded there, or
        # shard_failed); a photo no longer planned stays a record outside the manifest
        records += [r for r in stale if not spec.dry_run and r["key"] not in planned]
        # a record of another upload than the one listed (an earlier try of this run, cleared after the photo
        # was re-uploaded, whose shard's task failed this time) is no record of it: shard_failed below
        listed = {e["key"]: e["etag"] for e in manifest}
        records = [r for r in records if r.get("source_etag") in (None, listed.get(r["key"], r.get("source_etag")))]
        seen: dict[str, int] = {}
        for rec in records:
            seen[rec["key"]] = seen.get(rec["key"], 0) + 1
        unrecorded = 0
        for e in manifest:
            if e["key"] not in seen:
                # a shard's task failed for good: its photos' fate is unknown; failures, never published by this run
                unrecorded += 1
                records.append(record(e["key"], status="failed", reason="shard_failed",
                                      error=f"the masking task for this photo's shard failed in run {run_id}; "
                                            "see the task log and rerun the window"))
        processed = [rec for rec in records if not rec.get("skipped") and rec.get("reason") != "shard_failed"]
        timed = [rec for rec in processed if not rec.get("earlier_attempt")]
        wall = sum(s["wall_seconds"] for s in summaries)
        timings: dict[str, float] = {}
        for s in summaries:
            for k, v in s["timings_s"].items():
                timings[k] = timings.get(k, 0.0) + v
        model = next((s["model"] for s in summaries), None)
        # each failed photo's audit record names it: the report names the first MAX_FAILURES_LISTED of a reason
        report = build_report(records, timings=timings, model=model, failure_limit=qa.MAX_FAILURES_LISTED, extra={
            "region": spec.region, "window": spec.window.as_dict(), "run_id": spec.run_id, "run_key": spec.run_key,
            "backend": spec.backend, "mode": spec.mode, "collected": c is not None,
            "manifest": c and c["manifest"], "photos_in_window": c and c.get("photos_in_window", c["count"]),
            "planned": c and c["count"], "late": c and c.get("late", 0), "max_images": spec.max_images,
            # days before the window not collected by a run of their own yet: left to it, not taken as late
            "late_days_not_collected": (c or {}).get("late_days_not_collected", []),
            "skipped_hidden": (c or {}).get("skipped_hidden", {"count": 0, "keys": []}),
            "not_accounted_for": unrecorded, "duplicate_records": sum(n > 1 for n in seen.values()),
            # a dry run's manifest is not read (its records are the photos already done); an empty one is
            # checked like any other: a cleared run's earlier records must not pass for the window's
            "records_outside_manifest": len(set(seen) - planned) if c and not spec.dry_run else 0,
            "processed_this_run": len(processed),
            "would_process": sum(s.get("would_process", 0) for s in summaries) if spec.dry_run else None,
            "skipped_already_masked": sum(bool(rec.get("skipped")) for rec in records), "dry_run": spec.dry_run,
            # max_images cut the manifest: the run covered part of the window (no latest report, no Asset event)
            "partial": bool(c and c["count"] < c.get("listed", c["count"])), "listed": c and c.get("listed", c["count"]),
            "shards": sorted(summaries, key=lambda s: s["index"]),
            # of the photos the shards' last tries masked in their wall time: a retried task's earlier try's photos
            # took none of it (a retry that masked the last of 200 photos is not 200 times as fast)
            "mask_images_per_second": round(len(timed) / wall, 3) if wall > 0 and timed else None,
            "max_failure_rate": spec.max_failure_rate,
        })
        report["thresholds"] = {"score": next((s["threshold"] for s in summaries), spec.threshold)}
        held = not spec.dry_run and _holds_lock(client, settings, spec)  # (released only after QA)
        report["lock_held"] = held
        problems = verdict(report)
        report["verdict"] = {"passed": not problems, "problems": problems}
        own = qa_run_prefix(settings, spec)
        report_uri = _store(client, settings).put_json(own + "report.json", report)
        html = render_report(report, records, client=client, settings=settings, spec=spec,
                             masked_key=lambda k: masked_key(settings, spec.region, k),
                             samples=settings.review_samples, rng=random.Random(spec.window.id))
        store = _store(client, settings)
        store.write(own + "report.html", html.encode(), "text/html; charset=utf-8")
        latest = held and not report["partial"]
        if latest:  # the window's latest report: one run at a time holds the lock, so copies never interleave
            for name, ctype in (("report.json", "application/json"), ("report.html", "text/html; charset=utf-8")):
                store.write(qa_prefix(settings, spec) + name, store.read(own + name), ctype)
        log(f"{spec.region} {spec.window.id}: " + (headline(report) + f"; late: {report['late']}" if c else "not collected")
            + f" -> {report_uri}" + (" (latest)" if latest else "") + "".join(f"; PROBLEM: {p}" for p in problems))
        out.append({"region": spec.region, "window": spec.window.id, "run_id": spec.run_id, "report": report_uri,
                    "html": s3_uri(settings, own + "report.html"), "latest": latest, "dry_run": spec.dry_run,
                    "partial": report["partial"], "planned": report["planned"], "listed": report["listed"],
                    "failure_rate": report["failure_rate"], "max_failure_rate": spec.max_failure_rate,
                    "by_status": report["by_status"], "photos": report["images"], "review": report["review"]["count"],
                    "plates": report["plates"], "late": report["late"] or 0, "passed": not problems,
                    "problems": problems})
    return out


def check_reports(specs: list[dict], reports: list[dict]) -> None:
    """Raise ``RunError`` unless every planned region has a QA report that passed (every manifest
    entry has exactly one record, failure rate within its limit)."""
    problems = []
    have = {(r["region"], r["run_id"]) for r in reports}
    for d in specs:
        if (d["region"], d["run_id"]) not in have:
            problems.append(f"{d['region']}: no QA report")
    problems += [f"{r['region']} {r['window']}: {p} (see {r['html']})" for r in reports for p in r["problems"]]
    if problems:
        raise RunError("; ".join(problems))


def asset_extra(report: dict) -> dict | None:
    """The Asset event's ``extra`` for a region whose QA passed; None when no event may be emitted
    (QA did not pass, a dry run that masked nothing, or a partial run: ``max_images`` left photos
    of the window out, and an event says the window is masked)."""
    if not report["passed"] or report["dry_run"] or report.get("partial"):
        return None
    # ``late``: how many of counts' photos are late photos of the days before the window (their masked copies
    # are under those days), so that a consumer does not take counts.photos for the window's own photos
    return {"region": report["region"], "window": report["window"], "run_id": report["run_id"],
            "report": report["report"], "counts": {"photos": report["photos"], **report["by_status"]},
            "late": report.get("late", 0)}


def not_current(client, settings: Settings, report: dict) -> str | None:
    """Why this run's QA report may not have an Asset event now, or None: it must still be the window's
    current one (``qa/{region}/{window}/report.json`` holds exactly its bytes). A ``qa`` or ``publish``
    task cleared after the run released its locks (days later, after a newer run of the window wrote a
    newer report, or while its own report was rewritten without the locks) would otherwise tell the
    Asset's consumers to act on QA that is no longer the window's."""
    from botocore.exceptions import BotoCoreError, ClientError

    region, window = report["region"], report["window"]
    store = _store(client, settings)
    prefix = f"s3://{settings.bucket}/"
    own_key = report["report"][len(prefix):] if report["report"].startswith(prefix) else None
    latest_key = settings.qa_root.format(region=region, window=window) + "report.json"
    redo = (f"; an event now would point the Asset's consumers at QA that is not the window's. To publish this "
            f"window, rerun the whole window (trigger plate_masking with region {region} and its window "
            f"{window}); clearing this run's tasks cannot make its report current")
    try:
        own = store.read(own_key) if own_key else None
        found = store.get_json(latest_key)
        latest = store.read(latest_key) if found else None
    except (ClientError, BotoCoreError) as exc:  # S3 did not answer what is there: not a reason to skip the events
        raise RunError(f"{region} {window}: cannot tell whether this run's QA report {report['report']} is the "
                       f"window's current one: reading s3://{settings.bucket}/{latest_key} failed ({exc}); the task "
                       "fails (and retries), no Asset event is skipped for it; if it keeps failing, check the "
                       "connection's S3 access to qa/, then clear the publish task") from exc
    except ValueError as exc:  # the latest report.json is not JSON: not this run's report, whatever it is
        return (f"{region} {window}: s3://{settings.bucket}/{latest_key} cannot be read as a report ({exc}), so "
                f"this run's QA report {report['report']} is not the window's current one" + redo)
    if latest is None:
        return (f"{region} {window}: the window has no latest QA report (s3://{settings.bucket}/{latest_key}): "
                "this run did not hold the window's day locks when its QA was written" + redo)
    if latest != own:
        holder = found[0].get("run_id") if isinstance(found[0], dict) else None
        return (f"{region} {window}: this run's QA report {report['report']} is not the window's current one: "
                + (f"s3://{settings.bucket}/{latest_key} is now run {holder}'s" if holder != report["run_id"] else
                   f"it was written again without the window's locks (its qa task was cleared after the run "
                   f"released them) and differs from s3://{settings.bucket}/{latest_key}") + redo)
    return None
