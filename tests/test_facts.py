"""Shared facts have one home (platemask.constants): the CLI, the DAG's Params, runs, the pipeline
and the inference server all read the same masking modes, metadata policies, backends, model
environment variable and "auto" device rule."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from platemask import constants
from platemask.cli import build_parser, default_model_dir
from platemask.constants import (BACKENDS, DEFAULT_BACKEND, DEFAULT_MASK_MODE, DEFAULT_METADATA_POLICY, MASK_MODES,
                                 METADATA_POLICIES, MODEL_DIR_ENV, REPO_MODEL_DIR, resolve_device)
from platemask.settings import Settings


def _option(parser, command: str, flag: str):
    sub = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None) and command in a.choices)
    return next(a for a in sub.choices[command]._actions if flag in a.option_strings)


def _dag_params():
    spec = importlib.util.spec_from_file_location(f"plate_masking_{uuid.uuid4().hex}", ROOT / "dags" / "plate_masking.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.plate_masking_dag.params


def test_cli_choices_are_the_shared_tuples():
    p = build_parser()
    mode, metadata = _option(p, "mask", "--mode"), _option(p, "mask", "--metadata")
    assert tuple(mode.choices) == MASK_MODES and mode.default == DEFAULT_MASK_MODE
    assert tuple(metadata.choices) == METADATA_POLICIES and metadata.default == DEFAULT_METADATA_POLICY


def test_dag_params_enums_are_the_shared_tuples():
    params = _dag_params()
    for name, values, default in (("mode", MASK_MODES, DEFAULT_MASK_MODE), ("backend", BACKENDS, DEFAULT_BACKEND)):
        param = params.get_param(name)
        assert tuple(param.schema["enum"]) == values and param.value == default


@pytest.mark.parametrize("mode", MASK_MODES)
def test_every_mode_is_accepted_by_runs_and_mask(mode):
    from platemask.mask import MaskStyle
    from platemask.runspec import plan_runs

    (spec,) = plan_runs(Settings(), {"region": "DE", "mode": mode, "window_start": "2026-11-20",
                                         "window_end": "2026-11-21"}, run_id="r",
                        data_interval_end=None)
    assert spec.mode == mode and MaskStyle(mode=mode).mode == mode


@pytest.mark.parametrize("policy", METADATA_POLICIES)
def test_every_metadata_policy_is_accepted_by_the_pipeline(policy):
    from platemask.pipeline import JobOptions

    assert JobOptions(metadata=policy).metadata == policy


def test_one_model_variable_for_cli_settings_and_server(monkeypatch, tmp_path):
    from platemask.serve import create_app

    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    assert default_model_dir() == REPO_MODEL_DIR and Settings.load(env={}).model_dir == str(REPO_MODEL_DIR)
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("PLATEMASK_DEVICE", "cpu")
    assert default_model_dir() == tmp_path
    assert Settings.load().model_dir == str(tmp_path)
    assert create_app(load=False).extensions["platemask_model"].model_dir == str(tmp_path)
    p = build_parser()
    assert _option(p, "mask", "--model").default == str(tmp_path)


def test_auto_device_is_cuda_exactly_when_torch_has_it():
    torch = pytest.importorskip("torch")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def _literal_lists(values: tuple[str, ...]) -> re.Pattern:
    """Two or more of ``values`` as consecutive quoted items: a hand-written copy of the list."""
    item = "|".join(re.escape(v) for v in values)
    return re.compile(rf"""(["'])({item})\1\s*,\s*(["'])({item})\3""")


@pytest.mark.parametrize("values", [MASK_MODES, METADATA_POLICIES, BACKENDS], ids=["modes", "metadata", "backends"])
def test_no_hand_written_copy_of_a_shared_list(values):
    pattern = _literal_lists(values)
    home = Path(constants.__file__).resolve()
    copies = []
    for folder in ("platemask", "dags", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.resolve() == home:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    copies.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not copies, "use platemask.constants instead of:\n" + "\n".join(copies)


def test_no_copy_of_the_review_band_rule():
    copies = [str(p.relative_to(ROOT)) for folder in ("platemask", "dags", "plugins") for p in (ROOT / folder).rglob("*.py")
              if "min(cfg.review_low" in p.read_text()]
    assert not copies, copies


# ------------------------------------------------------------------ settings: a mistyped value is refused by name

def _parse_dag_file(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location(f"plate_masking_{uuid.uuid4().hex}", ROOT / "dags" / "plate_masking.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("env,named", [
    # before: parsed, then Airflow could not serialise plate_masking_de ("Failed to serialize DAG ...: Europe/Berlinn")
    ({"PLATEMASK_REGION_TIMEZONES": '{"DE": "Europe/Berlinn", "PL": "Europe/Warsaw", "TH": "Asia/Bangkok", '
                                    '"US": "America/New_York"}'}, "Europe/Berlinn"),
    ({"PLATEMASK_BATCH_SIZE": "four"}, "PLATEMASK_BATCH_SIZE"),  # before: "invalid literal for int() ...: 'four'"
    ({"PLATEMASK_REGION_TIMEZONES": "{DE: Europe/Berlin}"}, "PLATEMASK_REGION_TIMEZONES"),  # before: a bare JSONDecodeError
    ({"PLATEMASK_BUCKET": "s3://inspection-photos"}, "bucket name alone"),  # before: botocore's "Invalid bucket name" in collect
    ({"PLATEMASK_SSE": "kms"}, "PLATEMASK_SSE"),  # before: every write refused by S3
    ({"PLATEMASK_KMS_KEY_ID": "arn:aws:kms:eu-central-1:111122223333:key/k"}, "PLATEMASK_SSE=aws:kms"),  # before: key ignored
    ({"PLATEMASK_DEVICE": "gpu"}, "PLATEMASK_DEVICE"),  # before: torch's error in the first mask task
    ({"PLATEMASK_IO_WORKERS": "0"}, "PLATEMASK_IO_WORKERS"),
    ({"PLATEMASK_REGIONS": ""}, "PLATEMASK_REGIONS"),  # before: no nightly DAG at all, silently
])
def test_a_mistyped_setting_is_refused_by_name_when_the_dag_file_is_parsed(monkeypatch, env, named):
    with pytest.raises(ValueError) as exc:
        _parse_dag_file(monkeypatch, **env)
    assert named in str(exc.value)


@pytest.mark.parametrize("variable,named", [
    ({"batch_size": "8"}, "batch_size must be a whole number"),  # a JSON string: before, accepted, a TypeError in mask
    ({"shard_size": "200"}, "shard_size must be a whole number"),  # before: "'<' not supported between 'str' and 'int'"
    ({"late_days": -1}, "late_days=-1"),  # before: the message named retries and lock_wait_minutes only
    ({"sse": "AES"}, "setting sse"),
])
def test_a_variable_value_of_the_wrong_type_or_range_is_refused_by_name(variable, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Settings.load(variable, env={})


def test_every_settings_field_has_a_type_the_checks_know():
    from platemask.settings import _KINDS

    assert {f.type for f in dataclasses.fields(Settings)} <= set(_KINDS)
    assert Settings.load(env={}) == Settings()  # the defaults pass their own checks


def test_the_readme_documents_every_setting_with_its_default_and_the_parse_time_list_is_the_codes():
    """Before: the README's parse-time list lacked cpu_queue and cpu_pool (a deployer putting them in the
    Variable got a refusal the README said could not happen), and review_samples and six sagemaker_*
    settings were documented nowhere."""
    from platemask.settings import PARSE_TIME_FIELDS

    text = (ROOT / "README.md").read_text()
    cfg = text[text.index("## Configuration"):text.index("### Schedule and backfill")]
    listed = re.search(r"These fields \(`settings.PARSE_TIME_FIELDS`\)\s+are (.*?): set them", cfg, re.S).group(1)
    assert set(re.findall(r"`(\w+)`", listed)) == set(PARSE_TIME_FIELDS)
    defaults, documented = Settings(), set()
    for line in cfg.splitlines():
        row = re.match(r"\| ((?:`\w+`(?:, )?)+) \| ([^|]+) \|", line)
        if not row:
            continue
        names = re.findall(r"`(\w+)`", row.group(1))
        documented |= set(names)
        if names[0] in ("regions", "region_timezones"):
            continue  # described in words
        cells = [c.strip().strip("`") for c in row.group(2).split(",")] if len(names) > 1 else [row.group(2).strip().strip("`")]
        for name, cell in zip(names, cells):
            value = getattr(defaults, name)
            shown = "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            assert cell.startswith(shown) or str(value).endswith(cell), f"README says {name} defaults to {cell!r}, code: {value!r}"
    assert {f.name for f in dataclasses.fields(Settings)} <= documented


def test_the_readme_names_every_variable_the_container_server_reads():
    import platemask.serve as serve

    text = (ROOT / "README.md").read_text()
    source = Path(serve.__file__).read_text()
    names = set(re.findall(r"[\"']((?:PLATEMASK|SAGEMAKER)_[A-Z0-9_]+)[\"']", source))
    assert names and not [n for n in sorted(names) if n not in text]


@pytest.mark.parametrize("env,named", [
    ({"PLATEMASK_BUCKETT": "prod-inspection-photos"}, "did you mean PLATEMASK_BUCKET?"),  # before: the default bucket, silently
    ({"PLATEMASK_REGION": "DE"}, "did you mean PLATEMASK_REGIONS?"),  # before: every region's nightly DAG
    ({"PLATEMASK_MODEL": "/opt/models/v2"}, "set PLATEMASK_MODEL_DIR instead"),  # the retired name: the shipped model ran
])
def test_a_misspelt_or_retired_setting_variable_is_refused_not_left_at_its_default(monkeypatch, env, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        _parse_dag_file(monkeypatch, **env)


def test_variables_of_the_server_and_the_deployment_are_not_taken_for_misspelt_settings():
    others = {"PLATEMASK_RUNTIME": "torch", "PLATEMASK_THRESHOLD": "0.1", "PLATEMASK_REQUIRE_CUDA": "1",
              "PLATEMASK_SERVER_THREADS": "8", "PLATEMASK_PIXEL_BUDGET_MB": "512", "PLATEMASK_LOG_LEVEL": "info",
              "PLATEMASK_S3_ACCESS_KEY": "airflow-1", "PLATEMASK_S3_SECRET_KEY": "x" * 43,
              "PLATEMASK_CONTAINER_URL": "http://127.0.0.1:8080", "PLATEMASK_REAL_DATA": "/data"}
    assert Settings.load(env=others) == Settings()


def test_the_readme_lists_every_dag_param():
    """Before: unsafe_threshold, which a high threshold needs, was missing from the README's Params list."""
    text = (ROOT / "README.md").read_text()
    listed = text[text.index("DAG Params (validated"):text.index("A run whose `max_images`")]
    assert set(_dag_params().keys()) <= set(re.findall(r"`(\w+)`", listed))
