"""Deployment settings in one object: defaults, then the environment, then an Airflow Variable.

Tests build ``Settings(...)`` directly. The DAG file calls ``Settings.load()`` when it is parsed
(environment only: parsing reads no Variable) and ``Settings.from_airflow()`` inside tasks.
Environment variables are ``PLATEMASK_<FIELD>``; the Airflow Variable ``platemask_settings`` holds
a JSON object with the same field names, except the ``PARSE_TIME_FIELDS``, which it refuses.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields

from .constants import REPO_MODEL_DIR


# Read when the DAG file is parsed (schedules, Params, Assets, queues, pools, sensor timing, retries,
# deadlines, alerts): only the environment can set them, because parsing reads no Variable (no
# database access at parse time). The platemask_settings Variable refuses them rather than being
# silently ignored for half of the run.
PARSE_TIME_FIELDS = frozenset({
    "bucket", "regions", "region_timezones", "queue", "pool", "retries", "max_failure_rate", "deadline_hours",
    "lock_wait_minutes", "lock_poll_seconds", "sagemaker_poll_seconds", "sagemaker_max_runtime_hours",
    "alert_sns_topic_arn", "alert_aws_conn_id", "cpu_queue", "cpu_pool",
})


SSE_VALUES = (None, "AES256", "aws:kms", "aws:kms:dsse")  # S3's ServerSideEncryption values


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field annotation -> (check, what it must be); a field of another type needs an entry here
_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or empty"),
    "int": (_is_int, "a whole number"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "tuple[str, ...]": (lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
                        "a list of names (PLATEMASK_REGIONS=DE,PL)"),
    "dict[str, str]": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
                       'a JSON object of names to names ({"DE": "Europe/Berlin"})'),
}


def _where(name: str) -> str:
    variable = "" if name in PARSE_TIME_FIELDS else f" or the platemask_settings Variable's {name!r}"
    return f" (set by PLATEMASK_{name.upper()} in the environment{variable})"


def _from_env(name: str, kind: str, raw: str):
    """One ``PLATEMASK_<NAME>`` value, converted to the field's type; a value that does not convert is
    refused naming the variable, not with Python's bare ``invalid literal for int()``."""
    try:
        if kind == "tuple[str, ...]":
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        if kind == "dict[str, str]":
            return json.loads(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        what = {"int": "a whole number", "float": "a number", "dict[str, str]": "a JSON object"}[kind]
        raise ValueError(f"PLATEMASK_{name.upper()}={raw!r} in the environment is not {what} ({exc}); "
                         f"fix or unset it (setting {name})") from None
    if "None" in kind:
        return raw or None
    return raw


# variables that were read once and are not any more -> the one to set instead
RETIRED = {"PLATEMASK_MODEL": "PLATEMASK_MODEL_DIR"}


def _misspelt(env, names: list[str]) -> str | None:
    """A ``PLATEMASK_`` variable that names no setting but nearly names one (``PLATEMASK_BUCKETT``,
    ``PLATEMASK_REGION``) or a retired one: without this the setting kept its default silently (another
    bucket, all regions). Other ``PLATEMASK_`` variables (the server's, the tests') are left alone."""
    import difflib

    for var in sorted(k for k in env if k.startswith("PLATEMASK_")):
        name = var[len("PLATEMASK_"):].lower()
        if var in RETIRED:
            return f"{var} is no longer read: set {RETIRED[var]} instead (and unset {var})"
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
        if close:
            return (f"{var} is set but names no setting: did you mean PLATEMASK_{close[0].upper()}? As it is, "
                    f"{close[0]} keeps its default {getattr(Settings(), close[0])!r}; rename the variable")
    return None


@dataclass(frozen=True)
class Settings:
    bucket: str = "inspection-photos"
    # Key layout. {region} and the date parts of a day partition are filled in; the photo's own
    # path below the partition is kept when masking (masked/ mirrors raw/).
    raw_prefix: str = "raw/{region}/{yyyy}/{mm}/{dd}/"
    masked_root: str = "masked/{region}/"
    audit_root: str = "audit/{region}/"
    # A run's files are keyed by run ({run}: a readable key derived from the run_id), so runs of one
    # window never share a manifest, shards or detections. qa_root holds the window's latest report
    # (what the Plate QA view reads); each run's own report is under qa_root + "runs/{run}/".
    runs_root: str = "runs/{region}/{window}/{run}/"
    qa_root: str = "qa/{region}/{window}/"
    regions: tuple[str, ...] = ("DE", "PL", "TH", "US")
    region_timezones: dict[str, str] = field(default_factory=lambda: {"DE": "Europe/Berlin", "PL": "Europe/Warsaw",
                                                                      "TH": "Asia/Bangkok", "US": "America/New_York"})
    # 'partition': a photo's time is its day partition; 'last_modified': S3 LastModified, within the
    # day partitions the window touches (for windows that do not fall on midnights); a photo uploaded
    # after its partition's day goes to the window holding the day's last instant, one uploaded before
    # it to the window holding its midnight (platemask.runs.collect)
    time_source: str = "partition"
    shard_size: int = 200
    max_shards: int = 256
    aws_conn_id: str = "aws_default"
    sse: str | None = None  # e.g. "AES256" or "aws:kms"
    kms_key_id: str | None = None
    model_dir: str = str(REPO_MODEL_DIR)  # env PLATEMASK_MODEL_DIR (constants.MODEL_DIR_ENV)
    device: str = "auto"  # auto: cuda when the worker has it
    queue: str = "default"  # Celery queue for masking tasks; "gpu" to send them to GPU workers
    pool: str = "default_pool"  # e.g. "platemask_gpu" with one slot per GPU
    # backend=sagemaker: the mask step only reads the job's polygons and blurs (no model), so it runs
    # here, not on the GPU queue/pool above
    cpu_queue: str = "default"
    cpu_pool: str = "default_pool"
    batch_size: int = 4
    io_workers: int = 8
    max_failure_rate: float = 0.02
    # each run also picks up photos of this many day partitions before its window that have no audit
    # record (uploaded after their night's run); 0 = off
    late_days: int = 3
    retries: int = 3  # task retries (exponential backoff from 20 s)
    # one run masks a region-window at a time (an S3 lock object); another run waits this long for
    # it (reschedule sensor, no worker slot held), then fails naming the run holding it; 0 = fail at once
    lock_wait_minutes: float = 360.0
    lock_poll_seconds: int = 60
    deadline_hours: float = 6.0  # alert when a nightly run is not done this long after its window ends
    # alerts (run failure, missed deadline) go to this SNS topic through the Amazon provider's
    # SnsNotifier; empty = alerts off (only logged)
    alert_sns_topic_arn: str | None = None
    alert_aws_conn_id: str = "aws_default"  # AWS connection of the SNS notifier
    review_samples: int = 6  # random before/after samples in the HTML report
    # --- backend "sagemaker" (Batch Transform on our container); see README "SageMaker"
    sagemaker_conn_id: str | None = None  # AWS connection for SageMaker (default: aws_conn_id)
    sagemaker_role_arn: str | None = None
    sagemaker_image_uri: str | None = None
    sagemaker_instance_type: str = "ml.g5.xlarge"
    sagemaker_instance_count: int = 1  # instances per job; SageMaker spreads a job's manifest objects over them
    # backend=sagemaker: photos per shard, i.e. per transform job (each job pays its instances'
    # start-up, minutes): a region-window up to this size is one job, a larger one ceil(n / size)
    sagemaker_shard_size: int = 5000
    # GPU instance types only: the Batch Transform AMI (NVIDIA driver 535 runs CUDA 12.x builds; the
    # default AMI's driver 470 does not) -- see README "SageMaker"
    sagemaker_transform_ami_version: str | None = "al2-ami-sagemaker-batch-gpu-535"
    sagemaker_model_prefix: str = "sagemaker/models/"  # content-addressed model.tar.gz
    sagemaker_output_prefix: str = "sagemaker/output/{region}/{window}/"
    sagemaker_kms_key_id: str | None = None
    sagemaker_max_concurrent: int = 4
    sagemaker_invocation_timeout_s: int = 600
    sagemaker_invocation_retries: int = 2
    sagemaker_max_runtime_hours: float = 12.0
    sagemaker_poll_seconds: int = 60
    # development: run transform jobs against a container server at this URL (local runner) after
    # registering them with the SageMaker API (moto in tests), e.g. http://127.0.0.1:8080
    sagemaker_local_endpoint: str | None = None

    def __post_init__(self):
        problem = self.value_problem()
        if problem:
            raise ValueError(problem)
        if self.time_source not in ("partition", "last_modified"):
            raise ValueError(f"time_source must be 'partition' or 'last_modified', got {self.time_source!r}")
        if self.shard_size < 1 or self.sagemaker_shard_size < 1 or not 1 <= self.max_shards <= 1000:
            raise ValueError("shard_size and sagemaker_shard_size must be >= 1 and max_shards within 1..1000 "
                             "(Airflow maps at most 1024)")
        if "{run}" not in self.runs_root:
            raise ValueError(f"runs_root must contain {{run}} (runs of one window must not share files), got {self.runs_root!r}")
        if self.retries < 0 or self.late_days < 0 or self.lock_wait_minutes < 0 or self.lock_poll_seconds < 1:
            raise ValueError(f"retries, late_days and lock_wait_minutes must be >= 0 and lock_poll_seconds >= 1, got "
                             f"retries={self.retries}, late_days={self.late_days}, "
                             f"lock_wait_minutes={self.lock_wait_minutes}, lock_poll_seconds={self.lock_poll_seconds}")
        if not 0 <= self.max_failure_rate <= 1:
            raise ValueError(f"max_failure_rate must be within [0, 1], got {self.max_failure_rate}")
        partition = self.partition_problem()
        if partition:
            raise ValueError(partition)
        clash = self.layout_clash()
        if clash:
            raise ValueError(clash)

    def value_problem(self) -> str | None:
        """Why a field holds a value no run can use (wrong type, out of range, unknown time zone, a bucket
        given as a URL...), naming the field and where it is set; None when every value is usable. Checked
        when the settings are built (the DAG file's parse, every task's start), so a typo fails there, by
        name, not hours later in a mask task or as a DAG that Airflow cannot serialise."""
        import zoneinfo

        for f in fields(self):
            value, kind = getattr(self, f.name), _KINDS[f.type]
            if not kind[0](value):
                return (f"setting {f.name} must be {kind[1]}, got {value!r} ({type(value).__name__}){_where(f.name)}")
        positive = ("shard_size", "batch_size", "io_workers", "sagemaker_instance_count", "sagemaker_max_concurrent",
                    "sagemaker_invocation_timeout_s", "sagemaker_poll_seconds", "sagemaker_shard_size",
                    "sagemaker_max_runtime_hours")
        for name in positive + ("deadline_hours", "review_samples", "sagemaker_invocation_retries"):
            value = getattr(self, name)
            if value < 0 or (value == 0 and name in positive):
                return f"setting {name} must be {'> 0' if name in positive else '>= 0'}, got {value!r}{_where(name)}"
        bucket = self.bucket
        if not bucket or "/" in bucket or any(c.isspace() for c in bucket):
            return (f"setting bucket must be a bucket name alone (e.g. inspection-photos), got {bucket!r}: no s3://, "
                    f"no prefix (the key layout is raw_prefix, masked_root, ...), no spaces{_where('bucket')}")
        if self.sse not in SSE_VALUES:
            return (f"setting sse must be one of {', '.join(v for v in SSE_VALUES if v)} or empty (no encryption "
                    f"header), got {self.sse!r}{_where('sse')}")
        if self.kms_key_id and not (self.sse or "").startswith("aws:kms"):
            return (f"setting kms_key_id is {self.kms_key_id!r} but sse is {self.sse!r}: the key is only sent with "
                    "sse aws:kms (or aws:kms:dsse), so objects would be written without it; set PLATEMASK_SSE=aws:kms "
                    "too, or remove the key id")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            return f"setting device must be auto, cpu, cuda or cuda:N, got {self.device!r}{_where('device')}"
        if not self.regions:
            return ("setting regions is empty: no region would be masked (no nightly DAG); set PLATEMASK_REGIONS, "
                    "e.g. DE,PL,TH,US")
        twice = sorted({r for r in self.regions if self.regions.count(r) > 1})
        if twice:  # an ALL run would plan the region twice under one run folder: every photo masked twice
            return f"setting regions names {', '.join(twice)} more than once ({', '.join(self.regions)}){_where('regions')}"
        for r in self.regions:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", r):
                return (f"region {r!r} in setting regions is not a plain name (letters, digits, _ and -): it is "
                        f"part of S3 keys and of the DAG id{_where('regions')}")
            if r not in self.region_timezones:
                return (f"region {r!r} has no time zone in region_timezones: set PLATEMASK_REGION_TIMEZONES (a JSON "
                        f"object, e.g. {{\"{r}\": \"Europe/Berlin\", ...}}) with an IANA zone for every region in "
                        f"PLATEMASK_REGIONS ({', '.join(self.regions)})")
        for r, tz in self.region_timezones.items():
            try:
                zoneinfo.ZoneInfo(tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                return (f"region_timezones gives region {r} the time zone {tz!r}, which is no IANA time zone name "
                        f"(e.g. Europe/Berlin, America/New_York); a region's night is its local day{_where('region_timezones')}")
        return None

    def partition_problem(self) -> str | None:
        """Why ``raw_prefix`` does not name one region's one local day, or None. Collect lists the
        prefix of each day a window covers and the run locks those days: a prefix without the day
        (``raw/{region}/{yyyy}/{mm}/``) lists the whole month for every day, so a two-day window
        holds each photo twice and the nights of the 20th and 21st (two day locks) mask the same
        photos at once; one without ``{region}`` gives every photo to every configured region."""
        import string

        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.raw_prefix) if f is not None}
        except ValueError as exc:
            return f"raw_prefix {self.raw_prefix!r} is not a key template: {exc}"
        need = {"yyyy", "mm", "dd"} | ({"region"} if len(self.regions) > 1 else set())
        missing, unknown = sorted(need - names), sorted(names - {"region", "yyyy", "mm", "dd"})
        if not missing and not unknown and self.raw_prefix.endswith("}"):
            return (f"raw_prefix {self.raw_prefix!r} ends with a placeholder: the 20th's prefix '.../20' would also "
                    "list '.../20-old/', '.../201/' and any other key that starts with it; end it with the '/' (or "
                    "other character) that follows the day in your keys, e.g. raw/{region}/{yyyy}/{mm}/{dd}/")
        if not missing and not unknown:
            return None
        return (f"raw_prefix {self.raw_prefix!r} "
                + (f"lacks {', '.join('{' + m + '}' for m in missing)}" if missing else "")
                + (" and " if missing and unknown else "")
                + (f"has unknown placeholders {', '.join('{' + u + '}' for u in unknown)}" if unknown else "")
                + ": it must name one region's one local day (a day partition, e.g. raw/{region}/{yyyy}/{mm}/{dd}/), "
                  "or a window of two days would list its photos twice and two nights would mask the same photos "
                  "at once under different day locks")

    # every prefix a run writes under, beside raw_prefix, which it only reads
    WRITTEN_ROOTS = ("masked_root", "audit_root", "runs_root", "qa_root", "sagemaker_output_prefix",
                     "sagemaker_model_prefix")

    def roots(self, region: str) -> dict[str, str]:
        """The fixed part of each key template for ``region``: everything before the first
        placeholder other than {region} (``raw/DE/`` for ``raw/{region}/{yyyy}/...``)."""
        out = {}
        for name in ("raw_prefix", *self.WRITTEN_ROOTS):
            template = getattr(self, name).replace("{region}", "\0")
            out[name] = template.split("{")[0].replace("\0", region)
        return out

    def layout_clash(self) -> str | None:
        """Why these key templates would let a run write over originals or over its own files (a
        masked copy replacing the photo it was made from: originals gone, run green), or None.
        Roots that are equal or one a prefix of the other clash, for any two regions (a region's
        name is part of the key)."""
        regions = tuple(self.regions) or ("REGION",)
        per = {r: self.roots(r) for r in regions}
        for r1 in regions:
            for r2 in regions:
                named = [("raw_prefix", per[r1]["raw_prefix"])] + [(n, per[r2][n]) for n in self.WRITTEN_ROOTS]
                for i, (a, pa) in enumerate(named):
                    for b, pb in named[i + 1:]:
                        if a == b or not (pa.startswith(pb) or pb.startswith(pa)):
                            continue
                        if r1 != r2 and a != "raw_prefix":
                            continue  # two written roots of different regions: their region part tells them apart
                        return (f"{a} {getattr(self, a)!r} and {b} {getattr(self, b)!r} overlap ({pa!r} and {pb!r}"
                                f"{'' if r1 == r2 else f', regions {r1} and {r2}'}): "
                                + ("masked copies, audit records or run files would be written among the originals "
                                   "and could replace them" if a == "raw_prefix" else
                                   "one kind of file would be written among another and could replace it")
                                + "; give each its own prefix (defaults: raw/{region}/..., masked/{region}/, "
                                  "audit/{region}/, runs/..., qa/...)")
        return None

    @classmethod
    def load(cls, variable: dict | None = None, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        values: dict = {}
        types = {f.name: f.type for f in fields(cls)}
        typo = _misspelt(env, list(types))
        if typo:
            raise ValueError(typo)
        for name in types:
            raw = env.get(f"PLATEMASK_{name.upper()}")
            if raw is None:
                continue
            values[name] = _from_env(name, types[name], raw)
        if variable:
            unknown = set(variable) - set(types)
            if unknown:
                raise ValueError(f"unknown keys in the platemask_settings Variable: {sorted(unknown)}")
            parse_time = sorted(set(variable) & PARSE_TIME_FIELDS)
            if parse_time:
                env_names = ", ".join(f"PLATEMASK_{k.upper()}" for k in parse_time)
                raise ValueError(
                    f"the platemask_settings Variable sets {', '.join(parse_time)}: "
                    f"{'this is' if len(parse_time) == 1 else 'these are'} read when the DAG file is parsed "
                    "(schedules, Params, Assets, queues, pools, deadlines, alerts), where no Variable is read. "
                    f"Set {env_names} in the environment of the scheduler, DAG processor, triggerer and workers instead, "
                    "and remove them from the Variable.")
            values.update({k: tuple(v) if k == "regions" else v for k, v in variable.items()})
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Settings serialised with ``dataclasses.asdict`` (e.g. into a trigger's kwargs), back: every
        field as it was, the parse-time ones included (this is not the Variable)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "regions" else v for k, v in d.items() if k in known})

    @classmethod
    def from_airflow(cls) -> "Settings":
        """Inside a task: environment plus the ``platemask_settings`` Variable, if it exists."""
        from airflow.sdk import Variable

        try:
            raw = Variable.get("platemask_settings", default=None)
        except Exception:  # noqa: BLE001 - no Variable backend reachable (e.g. parsing): env only
            raw = None
        return cls.load(json.loads(raw) if raw else None)
