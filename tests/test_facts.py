"""Shared facts have one home (platemask.constants): the CLI, the DAG's Params, runs, the pipeline
and the inference server all read the same masking modes, metadata policies, backends, model
environment variable and "auto" device rule."""
from __future__ import annotations

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
