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
from vitsift_core.experiments.randomisation import RandParams


KP_KEYS = ("keypoint_rule", "dedupe_keypoints")   # issue 16: the half-pixel rule, one count per location


def _pre_issue16_key(params) -> str:
    """The key without what issue 16 added (the keypoint rule, the dedupe option), and with the
    pre-training format issue 18 replaced (v2: metrics.csv starts with epoch 0) set back to v1."""
    d = {k: v for k, v in params.identity().items() if k not in KP_KEYS}
    if d.get("format") == "mae-pretrain-v2":
        d["format"] = "mae-pretrain-v1"
    return store.key_of(d)


# Keys name result folders on disk. The old pins (computed with the code before store.py existed,
# each class with its own identity() and key()) still hold for the identity less issue 16's keys;
# the new pins are the keys after issue 16's half-pixel rule, which changed every count (so no old
# results folder is reused for the new numbers). Change a pin only with a change of what a run means.
def test_keys_of_the_three_params_classes():
    full = AnalysisParams(model="vit_small_patch16_224", images="imagenette:val", limit=200,
                          control="shuffle-keypoints", exclude_self=True, gamma=0.5, weighted=False,
                          img_size=160, sift={"contrast_threshold": 0.03}, batch_size=7, device="cpu",
                          precision="bf16")
    mfull = MaskEvalParams(classifier="vit_base_patch16_224.augreg2_in21k_ft_in1k", ratios=[0, 12.5, 20],
                           orders=["top", "random"], modes=["fill", "drop"], layer="7-9", n_boot=10)
    guided = PretrainConfig(mask="guided", order="score", score_layer=2, betas=(0.2, 0.4), epochs=2,
                            train_limit=300, device="cpu")
    pins = [(AnalysisParams(), "0c7a15c8e602", "07d2c745c49a"), (full, "8f2160befd00", "89ac76cc399b"),
            (MaskEvalParams(), "ff95583f1c4d", "b43785eae951"), (mfull, "25cfde07ad21", "9f8fc35fb741"),
            (PretrainConfig(), "8ae2512f04be", "194ff6728701"), (guided, "d837942ea892", "61735aec8785")]
    for p, old, new in pins:                    # (params, key before issue 16, key now)
        assert _pre_issue16_key(p) == old and p.key() == new != old
    # issue 18 (format v2, epoch 0 in metrics.csv): new pre-training keys; before it 95a094cb8d81 and
    # 81e8887317a1 (key), 4685c7cd8086 and 5977823033e1 (recipe_key)
    assert PretrainConfig().recipe_key() == "0b06f7f94a49"
    assert guided.recipe_key() == "eb62a2a23452"


@pytest.mark.parametrize("cls", [AnalysisParams, MaskEvalParams, PretrainConfig, RandParams])
def test_keypoint_rule_is_part_of_every_identity_that_uses_counts(cls, monkeypatch):
    from vitsift_core.data import keypoints as mod
    from vitsift_core.data.keypoints import KEYPOINT_RULE

    p = cls()
    assert p.identity()["keypoint_rule"] == KEYPOINT_RULE
    # another rule, another key: the value is read where the identity is made, not frozen elsewhere
    before = p.key()
    monkeypatch.setattr(mod, "KEYPOINT_RULE", "some-other-rule")
    assert p.identity()["keypoint_rule"] == "some-other-rule" and p.key() != before


def test_dedupe_keypoints_is_an_analysis_parameter():
    a, b = AnalysisParams(), AnalysisParams(dedupe_keypoints=True)
    assert a.identity()["dedupe_keypoints"] is False and b.identity()["dedupe_keypoints"] is True
    assert a.key() != b.key()


def test_chunk_is_a_parameter():
    # the keys under VITSIFT_CHUNK=4, before and after issue 16's keypoint rule
    assert _pre_issue16_key(AnalysisParams(chunk=4)) == "b8daeb34b31a"
    assert _pre_issue16_key(MaskEvalParams(chunk=4)) == "82d6671ec39e"
    assert AnalysisParams(chunk=4).key() == "43d75498e958"
    assert MaskEvalParams(chunk=4).key() == "d675a42d81d3"
    ident = AnalysisParams(chunk=4).identity()
    assert ident["chunk"] == 4 and AnalysisParams(chunk=5).key() != AnalysisParams(chunk=4).key()
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
    assert run.is_complete()
    assert json.loads((run.path / "run.json").read_text()) == {"complete": True, "n_images": 1}
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
