"""Notebooks: committed clean, declared parameters match the profiles, and each runs (smoke)."""
import json

import pytest
import yaml

from vitsift_core import reproduce as R

NOTEBOOKS = R.notebook_paths()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_conventions(nb):
    d = json.loads(nb.read_text())
    cells = d["cells"]
    assert cells[0]["cell_type"] == "markdown", "first cell states the paper's claim"
    ids = [c.get("id") for c in cells]        # nbformat 4.5: every cell has a unique id
    assert None not in ids and len(set(ids)) == len(ids), f"{nb.name}: cells without a unique id"
    code = [c for c in cells if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), f"{nb.name} has outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    src = "".join(tagged[0]["source"])
    assert "profile: str" in src
    for line in src.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"parameter without a comment: {line!r}"
    assert "sys.path" not in "".join("".join(c["source"]) for c in code)
    assert not any("".join(c["source"]).lstrip().startswith(("!pip", "!wget")) for c in code)


@pytest.mark.parametrize("profile", sorted(p.stem for p in R.PARAMS.glob("*.yaml")))
def test_profiles_match_notebooks(profile):
    jobs = R.plan(R.load_profile(profile), NOTEBOOKS)
    if profile == "smoke":
        assert [nb for nb, _ in jobs] == NOTEBOOKS, "every notebook needs a smoke run"


def test_unknown_keys_are_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"parameters": {"limitt": 3}}))
    with pytest.raises(R.ProfileError, match="limitt"):
        R.plan(R.load_profile(str(p)), NOTEBOOKS)
    nb = NOTEBOOKS[0].stem
    p.write_text(yaml.safe_dump({"notebooks": {nb: {"gama": 2}}}))
    with pytest.raises(R.ProfileError, match="gama"):
        R.plan(R.load_profile(str(p)), NOTEBOOKS)
    p.write_text(yaml.safe_dump({"paramters": {}}))
    with pytest.raises(R.ProfileError, match="paramters"):
        R.load_profile(str(p))
    with pytest.raises(R.ProfileError, match="no profile"):
        R.load_profile("no-such-profile")


def test_profile_values_type_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    """issue 15 case 5: `limit: "four"` passed --check, then notebook 02 died after 01 ran."""
    p = tmp_path / "p"                       # a path without .yaml: used as given, not under params/
    p.write_text(yaml.safe_dump({"parameters": {"limit": "four", "gamma": 2},
                                 "notebooks": {"07_guided_mae": {"norm_pix_loss": 1, "blr": "1e-3"},
                                               "06_spurious_masking": {"probe_per_class": None}}}))
    monkeypatch.chdir(tmp_path)
    assert R.main(["--profile", "./p", "--check"]) == 2
    err = capsys.readouterr().err
    assert "no profile" not in err
    assert "parameters.limit: 02_sift_keypoints, 03_patch_interrelation, 04_attention_focus, 05_stages, " \
           "08_explorers, 09_zoo expect int, got 'four'" in err
    assert "parameters.limit: 06_spurious_masking expects int or null, got 'four'" in err
    assert "notebooks.07_guided_mae.norm_pix_loss: 07_guided_mae expects bool, got 1" in err
    assert "notebooks.07_guided_mae.blr: 07_guided_mae expects float, got '1e-3'" in err
    assert "gamma" not in err and "probe_per_class" not in err      # int for float, None where declared
    monkeypatch.setattr("papermill.execute_notebook", lambda *a, **k: pytest.fail("executed a notebook"))
    assert R.main(["--profile", str(p)]) == 2


@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("smoke")
    mp.setenv("VITSIFT_REPORTS", str(root / "reports"))
    mp.setenv("VITSIFT_RESULTS", str(root / "results"))   # shared: later notebooks read 02's runs
    yield root
    mp.undo()


def embedded_runs(root) -> list[str]:
    """The analysis folders of the embedded model under ``root``'s results."""
    return sorted(p.parent.name for p in (root / "results" / "analysis").glob("*/params.json")
                  if '"model": "embedded"' in p.read_text())


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_smoke_profile(nb, smoke_env):
    before = embedded_runs(smoke_env)
    ran = R.run("smoke", [nb])
    assert ran and ran[0]["notebook"] == nb.stem
    out = json.loads((smoke_env / "reports" / nb.name).read_text())
    errors = [o for c in out["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    figs = list((smoke_env / "reports" / "figures").glob(f"{nb.stem[:2]}_*.png"))
    assert figs, f"{nb.name} saved no figure"
    assert (smoke_env / "reports" / "index.md").exists()
    index = (smoke_env / "reports" / "index.html").read_text()   # every executed notebook so far, rendered
    assert f'href="html/{nb.stem}.html"' in index and (smoke_env / "reports" / "html" / f"{nb.stem}.html").exists()
    if nb.stem == "06_spurious_masking":
        # the content / shape split of Top's damage is computed (top_other is a default order)
        split = (smoke_env / "reports" / "tables" / "06_content_vs_shape.csv").read_text().splitlines()
        assert split[0].startswith("mode,ratio,top_minus_random,content") and len(split) >= 3
    if nb.stem == "09_zoo" and before:
        # the embedded model's suite is read back from notebook 02's folders, not recomputed
        assert embedded_runs(smoke_env) == before
        wide = (smoke_env / "reports" / "tables" / "09_claims_by_model.csv").read_text().splitlines()
        assert "random-init weights" in wide[0] and len(wide) > 5
