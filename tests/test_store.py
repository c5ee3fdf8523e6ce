"""The run store (vitsift_core.store): keys that name result folders, the identity check, run folders,
atomic writes, the chunk size as a parameter."""
import dataclasses
import json

import numpy as np
import pytest

from vitsift_core import store
from vitsift_core.experiments.analysis import AnalysisParams
from vitsift_core.experiments.maskeval import MaskEvalParams
from vitsift_core.experiments.pretrain import PretrainConfig


# Keys computed with the code before store.py existed (each class had its own identity() and key()).
# They name result folders on disk: they must never change.
def test_keys_of_the_three_params_classes_are_the_old_ones():
    assert AnalysisParams().key() == "0c7a15c8e602"
    assert AnalysisParams(model="vit_small_patch16_224", images="imagenette:val", limit=200,
                          control="shuffle-keypoints", exclude_self=True, gamma=0.5, weighted=False,
                          img_size=160, sift={"contrast_threshold": 0.03}, batch_size=7, device="cpu",
                          precision="bf16").key() == "8f2160befd00"
    assert MaskEvalParams().key() == "ff95583f1c4d"
    assert MaskEvalParams(classifier="vit_base_patch16_224.augreg2_in21k_ft_in1k", ratios=[0, 12.5, 20],
                          orders=["top", "random"], modes=["fill", "drop"], layer="7-9",
                          n_boot=10).key() == "25cfde07ad21"
    assert PretrainConfig().key() == "8ae2512f04be"
    assert PretrainConfig().recipe_key() == "6845b23aa846"
    guided = PretrainConfig(mask="guided", order="score", score_layer=2, betas=(0.2, 0.4), epochs=2,
                            train_limit=300, device="cpu")
    assert (guided.key(), guided.recipe_key()) == ("d837942ea892", "a73ead37e665")


def test_chunk_is_a_parameter_with_the_old_keys():
    # the keys the old code gave under VITSIFT_CHUNK=4
    assert AnalysisParams(chunk=4).key() == "b8daeb34b31a"
    assert MaskEvalParams(chunk=4).key() == "82d6671ec39e"
    ident = AnalysisParams(chunk=4).identity()
    assert list(ident)[-1] == "chunk" and ident["chunk"] == 4             # params.json layout as before
    assert list(MaskEvalParams().identity())[-1] == "chunk"
    assert "batch_size" not in ident and AnalysisParams(batch_size=3).key() == AnalysisParams().key()
    for bad in (AnalysisParams, MaskEvalParams):
        with pytest.raises(ValueError, match="chunk"):
            bad(chunk=0)


@dataclasses.dataclass
class _P(store.Params):
    a: int = 1
    b: str = "x"
    c: float = 0.5
    device: str = "cpu"
    RUNTIME_KEYS = ("device",)


def test_run_mismatch_names_every_differing_key(tmp_path):
    store.RunFolder(tmp_path / "r", _P()).prepare(3)
    pj = json.loads((tmp_path / "r" / "params.json").read_text())
    assert pj["identity"] == {"a": 1, "b": "x", "c": 0.5} and pj["runtime"] == {"device": "cpu"}
    assert pj["key"] == _P().key() and pj["n_images"] == 3
    store.RunFolder(tmp_path / "r", _P(device="cuda")).prepare(3)         # runtime keys may differ
    with pytest.raises(store.RunMismatch) as e:
        store.RunFolder(tmp_path / "r", _P(a=2, b="y")).prepare(3)
    msg = str(e.value)
    assert "a: 1 there vs 2 now" in msg and "b: 'x' there vs 'y' now" in msg and "c:" not in msg


def test_atomic_write_leaves_no_temp_file(tmp_path):
    f = tmp_path / "t.json"
    store.write_json(f, {"x": [1, 2]})
    assert json.loads(f.read_text()) == {"x": [1, 2]}
    store.savez(tmp_path / "a.npz", v=np.arange(3))
    assert np.load(tmp_path / "a.npz")["v"].tolist() == [0, 1, 2]

    def fails(p):
        p.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        store.atomic_write(f, fails)
    assert json.loads(f.read_text()) == {"x": [1, 2]}                   # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "t.json"]


def test_run_folder_parts_info_complete_and_siblings(tmp_path):
    run = store.RunFolder(tmp_path / "one", _P())
    run.prepare(1)
    assert run.part(7, "score-") == tmp_path / "one" / "parts" / "score-00007.npz"
    run.set_info(model={"spec": "m"})
    assert json.loads(run.params_json.read_text())["model"] == {"spec": "m"}
    assert not run.is_complete()
    run.mark_complete(n_images=1)
    assert run.is_complete() and json.loads((run.path / "run.json").read_text()) == {"complete": True, "n_images": 1}
    store.RunFolder(tmp_path / "same-but-c", _P(c=0.7)).prepare(1)
    store.RunFolder(tmp_path / "other-a", _P(a=5)).prepare(1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "params.json").write_text("{not json")
    without_c = lambda ident: {k: v for k, v in ident.items() if k != "c"}
    assert run.siblings(without_c) == [tmp_path / "same-but-c"]
    assert run.siblings(lambda ident: ident) == []


def test_distributed_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, barrier = store.distributed()
    assert (rank, world, barrier) == (0, 1, None)
    assert store.rank_device("auto", 1) == "auto"
