"""The S3 key layout of a nightly run: one home for every key and prefix it reads or writes (pure).

Layout (all under ``settings.bucket``):
  raw/{region}/{yyyy}/{mm}/{dd}/...            originals (read only, never modified)
  masked/{region}/{yyyy}/{mm}/{dd}/...         masked copies, same relative path
  audit/{region}/{yyyy}/{mm}/{dd}/....json     one audit record per photo (source ETag, model, result)
  runs/{region}/{window}/{run}/collected.json  what collect found (written last: present = collected), with
                                               the late days whose locks it took (``late_locks``)
  runs/{region}/{window}/{run}/manifest.jsonl  what the run covers: key, size, ETag
  runs/{region}/{window}/{run}/sharded.json    how many shards the latest cut made (``runs.SHARDED``)
  runs/{region}/{window}/{run}/shards/NNNN.jsonl      the manifest cut into shards
  runs/{region}/{window}/{run}/detections/NNNN.jsonl  detection records per shard (+ NNNN.summary.json)
  runs/{region}/locks/{yyyy-mm-dd}.json        which run masks this region's local day now (S3 conditional
                                               writes); a run holds the lock of every day its window touches,
                                               and of each late day whose photos it picks up
  runs/{region}/days/{yyyy-mm-dd}.json         written by collect for each day its window covers whole: a run of
                                               its own has collected that day (late pick-up takes only such days)
  qa/{region}/{window}/runs/{run}/report.json|report.html   the run's QA
  qa/{region}/{window}/report.json|report.html the latest non-dry run's QA (a copy; what the Plate QA
                                               view reads). The HTML embeds thumbnails of originals,
                                               so it stays in the QA prefix with its access rules

``{run}`` is ``run_key(run_id)``: runs of one window never share a file, and only one run at a time
holds the locks of a region's days, so a manual or dry run never shortens another run's coverage.
"""
from __future__ import annotations

import re

from .runspec import RunSpec
from .settings import Settings

S3_MAX_KEY_BYTES = 1024  # S3 refuses longer keys (KeyTooLongError)


def raw_root(settings: Settings, region: str) -> str:
    return settings.roots(region)["raw_prefix"]


def masked_key(settings: Settings, region: str, raw_key: str) -> str:
    root = raw_root(settings, region)
    if not raw_key.startswith(root):
        raise ValueError(f"key {raw_key!r} is not under {root!r}")
    return settings.masked_root.format(region=region) + raw_key[len(root):]


def audit_key(settings: Settings, region: str, raw_key: str) -> str:
    return settings.audit_root.format(region=region) + raw_key[len(raw_root(settings, region)):] + ".json"


def run_prefix(settings: Settings, spec: RunSpec) -> str:
    """This run's own files for the region-window (manifest, shards, detections)."""
    return settings.runs_root.format(region=spec.region, window=spec.window.id, run=spec.run_key)


def lock_keys(settings: Settings, spec: RunSpec) -> list[str]:
    """The lock objects a run of ``spec`` must hold to mask: one per local calendar day its window
    touches, in order, shared by every run of the region (``runs/{region}/locks/{yyyy-mm-dd}.json``, below runs_root's fixed part).
    Per day, not per window: a nightly window and a manual window over three days share that night's
    lock, so overlapping windows never mask the same photos at once; taken in day order, two runs
    never wait on each other."""
    root = settings.roots(spec.region)["runs_root"]  # runs_root up to its first placeholder but {region}
    return [f"{root}locks/{d.isoformat()}.json" for d in spec.window.days(settings.region_timezones[spec.region])]


def qa_prefix(settings: Settings, spec: RunSpec) -> str:
    """The region-window's QA folder: the latest run's report.json/report.html (the Plate QA view reads these)."""
    return settings.qa_root.format(region=spec.region, window=spec.window.id)


def qa_run_prefix(settings: Settings, spec: RunSpec) -> str:
    """This run's own QA report."""
    return qa_prefix(settings, spec) + f"runs/{spec.run_key}/"


_BOUND = r"\d{8}T\d{4}(?:\d{2}(?:\.\d{6})?)?Z"
WINDOW_ID = re.compile(rf"^{_BOUND}-{_BOUND}$")  # Window.id: to the minute, or to the second (microsecond)
REGION = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


# --- the QA view's keys: built only from a plain region and window id (URL parts are untrusted)

def qa_key(settings: Settings, region: str, window: str, name: str) -> str:
    """Key of a QA file, refusing anything that is not a plain region and window id."""
    if not REGION.match(region) or not WINDOW_ID.match(window):
        raise ValueError(f"not a region/window: {region!r}/{window!r}")
    return settings.qa_root.format(region=region, window=window) + name


def qa_windows_prefix(settings: Settings, region: str) -> str:
    """The prefix below which a region's window folders are listed (``qa/{region}/``)."""
    if not REGION.match(region):
        raise ValueError(f"not a region: {region!r}")
    return settings.qa_root.split("{window}")[0].format(region=region)


def s3_uri(settings: Settings, key: str) -> str:
    return f"s3://{settings.bucket}/{key}"


def key_too_long(settings: Settings, region: str, raw_key: str) -> str | None:
    """Why a photo's outputs cannot be written to S3 (a key over 1,024 bytes), or None. Checked before
    anything of the photo is written, so it is never published without its audit record."""
    for what, key in (("masked copy", masked_key(settings, region, raw_key)), ("audit record", audit_key(settings, region, raw_key))):
        n = len(key.encode("utf-8"))
        if n > S3_MAX_KEY_BYTES:
            return (f"s3://{settings.bucket}/{raw_key}: its {what} key would be {n} bytes, over S3's "
                    f"{S3_MAX_KEY_BYTES}-byte limit; shorten the photo's path below raw/ (nothing was published)")
    return None

