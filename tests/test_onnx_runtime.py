"""The detector's trunk and the verifier on ONNX Runtime: the same plates as PyTorch, the shipped graphs
are exactly the shipped weights, and a graph that does not belong to its folder is refused (never
silently used)."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from platemask.model import load_config
from platemask.onnx_export import write_onnx
from platemask.onnx_runtime import TRUNK_FILE, VERIFIER_FILE, choose_runtime
from platemask.segment import Segmenter


def _photos(n: int = 3, seed: int = 3) -> list[np.ndarray]:
    from platemask.training.synth import synth_car_scene

    rng = np.random.default_rng(seed)
    return [synth_car_scene(rng, n_plates=int(rng.integers(1, 3)), plate_width=(30, 160))[0] for _ in range(n)]


def _same_plates(a, b, *, score_tol=1e-4, px_tol=0.5):
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert len(pa) == len(pb)
        for x, y in zip(sorted(pa, key=lambda p: -p.score), sorted(pb, key=lambda p: -p.score)):
            assert abs(x.score - y.score) <= score_tol
            assert np.abs(np.asarray(x.box) - np.asarray(y.box)).max() <= px_tol


def test_shipped_model_ships_graphs_of_its_own_weights(model_dir):
    cfg = load_config(model_dir)
    assert cfg.onnx.get("trunk"), "the shipped model has no ONNX trunk: run 'platemask export-onnx'"
    assert cfg.onnx["trunk"]["weights_sha256"] == cfg.weights_sha256
    assert cfg.onnx["verifier"]["weights_sha256"] == cfg.verifier["weights_sha256"]
    assert cfg.onnx["orientation"]["weights_sha256"] == cfg.orientation["weights_sha256"]
    for part in ("trunk", "verifier", "orientation"):
        assert (model_dir / cfg.onnx[part]["file"]).is_file()


def _same_graph(shipped, exported) -> None:
    """The same graph: nodes, inputs, outputs and opsets identical, every initializer equal to within
    float32 rounding. Folding batch norm into the convolutions is float arithmetic whose last bit
    depends on the CPU's kernels (a host with AVX-512 FP16 differed from the one that exported the
    shipped graphs in 85 of 120 trunk initializers, by at most 2e-7 relative), so the bytes may differ
    by host while the graph is the same."""
    import onnx
    from onnx import numpy_helper

    a, b = onnx.load(str(shipped)), onnx.load(str(exported))
    assert a.opset_import == b.opset_import
    assert [(n.op_type, list(n.input), list(n.output), [x.SerializeToString() for x in n.attribute]) for n in a.graph.node] == \
        [(n.op_type, list(n.input), list(n.output), [x.SerializeToString() for x in n.attribute]) for n in b.graph.node]
    assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]
    theirs = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert sorted(theirs) == sorted(i.name for i in a.graph.initializer)
    for init in a.graph.initializer:
        x, y = numpy_helper.to_array(init), theirs[init.name]
        assert x.dtype == y.dtype and x.shape == y.shape, init.name
        if x.dtype.kind == "f":
            scale = max(float(np.abs(x).max()), 1e-30)
            assert float(np.abs(x.astype(np.float64) - y).max()) <= 1e-6 * scale, init.name
        else:
            assert np.array_equal(x, y), init.name


def test_re_exporting_the_shipped_weights_gives_the_shipped_graphs(model_dir, tmp_path):
    pytest.importorskip("onnx")
    cfg = load_config(model_dir)
    if cfg.onnx.get("exported_with_torch") != torch.__version__.split("+")[0]:
        pytest.skip(f"trunk exported with torch {cfg.onnx.get('exported_with_torch')}, this is {torch.__version__}")
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    for part in ("trunk", "verifier", "orientation"):
        (copy / cfg.onnx[part]["file"]).unlink()
    entry = write_onnx(copy)
    for part in ("trunk", "verifier", "orientation"):
        assert entry[part]["weights_sha256"] == cfg.onnx[part]["weights_sha256"]
        _same_graph(model_dir / cfg.onnx[part]["file"], copy / entry[part]["file"])


def test_onnx_and_torch_find_the_same_plates(model_dir):
    photos = _photos()
    onnx = Segmenter(model_dir, runtime="onnx")
    torch_ = Segmenter(model_dir, runtime="torch")
    assert (onnx.runtime, torch_.runtime) == ("onnx", "torch")
    assert (onnx.verifier.runtime, torch_.verifier.runtime) == ("onnx", "torch")
    a, b = onnx(photos), torch_(photos)
    assert sum(len(p) for p in a) > 0, "the comparison needs detections"
    _same_plates(a, b)


def test_auto_takes_onnx_on_cpu_and_torch_without_a_trunk(model_dir):
    spec = load_config(model_dir).onnx
    assert choose_runtime("auto", torch.device("cpu"), spec) == "onnx"
    assert choose_runtime("auto", torch.device("cpu"), {}) == "torch"
    assert choose_runtime("auto", torch.device("cuda"), spec) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        choose_runtime("onnx", torch.device("cuda"), spec)
    with pytest.raises(ValueError, match="export-onnx"):
        choose_runtime("onnx", torch.device("cpu"), {})
    with pytest.raises(ValueError, match="not one of"):
        choose_runtime("tensorrt", torch.device("cpu"), spec)


@pytest.fixture
def model_copy(model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    return copy


def _edit_config(folder, part, **fields):
    d = json.loads((folder / "config.json").read_text())
    d["onnx"][part].update(fields)
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("part", ["trunk", "verifier"])
def test_a_graph_of_other_weights_is_refused(model_copy, part):
    _edit_config(model_copy, part, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match=f"ONNX {part} .* exported from other weights"):
        Segmenter(model_copy)


@pytest.mark.parametrize("part,file", [("trunk", TRUNK_FILE), ("verifier", VERIFIER_FILE)])
def test_a_corrupt_graph_is_refused(model_copy, part, file):
    data = bytearray((model_copy / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_copy / file).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"ONNX {part} .*SHA-256"):
        Segmenter(model_copy)


def test_a_missing_graph_names_the_fix(model_copy):
    (model_copy / TRUNK_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="export-onnx"):
        Segmenter(model_copy)
    # the PyTorch path does not need it
    assert Segmenter(model_copy, runtime="torch").runtime == "torch"


def test_a_retrained_verifier_runs_on_pytorch_until_it_is_exported(model_copy):
    """train-verifier writes new weights: the old verifier.onnx entry goes, the new verifier runs on
    PyTorch (the trunk stays on ONNX Runtime), and export-onnx brings it back."""
    from platemask.training.verifier import save_verifier
    from platemask.verify import build_verifier

    torch.manual_seed(0)
    save_verifier(build_verifier(), model_copy, {"note": "new weights"})
    cfg = load_config(model_copy)
    assert "verifier" not in cfg.onnx and cfg.onnx["trunk"]
    seg = Segmenter(model_copy)
    assert (seg.runtime, seg.verifier.runtime) == ("onnx", "torch")
    pytest.importorskip("onnx")
    write_onnx(model_copy)
    assert Segmenter(model_copy).verifier.runtime == "onnx"


def test_export_onnx_adds_a_trunk_that_auto_then_uses(model_copy):
    pytest.importorskip("onnx")
    from platemask.cli import main

    d = json.loads((model_copy / "config.json").read_text())
    d["onnx"] = {}
    (model_copy / "config.json").write_text(json.dumps(d))
    (model_copy / TRUNK_FILE).unlink()
    (model_copy / VERIFIER_FILE).unlink()
    assert Segmenter(model_copy).runtime == "torch"
    assert main(["export-onnx", "--model", str(model_copy)]) == 0
    assert Segmenter(model_copy).runtime == "onnx"


def test_concurrent_callers_each_get_their_own_plates(model_dir):
    """The RPN head's outputs are handed over per thread: two threads never mix their photos."""
    photos = _photos(4, seed=11)
    seg = Segmenter(model_dir, runtime="onnx", batch_size=1)
    alone = [seg([p])[0] for p in photos]
    got: dict[int, list] = {}
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = seg([photos[i]])[0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(photos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _same_plates([got[i] for i in range(len(photos))], alone)
