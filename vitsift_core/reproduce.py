"""`make reproduce`: run every notebook headless with one profile's parameters (``params/<name>.yaml``,
checked key by key against the notebooks' parameters cells first; README "Layout").
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import yaml

from vitsift_core.paths import ROOT, reports_dir

NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"


class ProfileError(ValueError):
    """A profile key that no notebook declares, a value of the wrong type, or a malformed profile."""


TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def declared_type(decl: dict) -> tuple[type | None, bool]:
    """(type, None allowed) of one parameter: its annotation (``Optional[X]`` allows None), else its
    default's type (a None default allows None and says nothing more); (None, True): anything."""
    name = decl["inferred_type_name"].replace(" ", "")
    optional = name.startswith("Optional[") and name.endswith("]")
    name = name[9:-1] if optional else name
    if name in TYPES:
        return TYPES[name], optional
    try:
        default = ast.literal_eval(decl["default"])
    except (ValueError, SyntaxError):
        return None, True
    return (None, True) if default is None else (type(default), optional)


def type_ok(value, typ: type | None, optional: bool) -> bool:
    """bool only for bool, int (not bool) for int, int or float for float."""
    if typ is None or (value is None and optional):
        return True
    if isinstance(value, bool) or typ is bool:
        return typ is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if typ is float else typ)


def type_errors(where: str, profile: dict, declared: dict) -> list[str]:
    """One line per (profile key, value) that a notebook's parameters cell types otherwise."""
    bad: dict[tuple[str, str], list[str]] = {}
    for nb, decl in declared.items():
        over = profile["notebooks"].get(nb) or {}
        for k, v in {**profile["parameters"], **over}.items():
            typ, optional = declared_type(decl[k]) if k in decl else (None, True)
            if not type_ok(v, typ, optional):
                at = f"notebooks.{nb}.{k}" if k in over else f"parameters.{k}"
                bad.setdefault((at, f"{typ.__name__}{' or null' if optional else ''}, got {v!r}"), []).append(nb)
    return [f"{where}: {at}: {', '.join(nbs)} expect{'s' if len(nbs) == 1 else ''} {msg}"
            for (at, msg), nbs in bad.items()]


def notebook_paths(folder: Path = NOTEBOOKS) -> list[Path]:
    """notebooks/NN_*.ipynb in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def declared_parameters(nb: Path) -> dict[str, dict]:
    import papermill as pm
    return pm.inspect_notebook(str(nb))


def load_profile(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not p.suffix and os.sep not in name_or_path and "/" not in name_or_path:   # a name, not a path
        p = PARAMS / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in PARAMS.glob("*.yaml")))
        raise ProfileError(f"no profile {name_or_path!r} (looked for {p}); known profiles: {known}")
    d = yaml.safe_load(p.read_text()) or {}
    unknown_top = set(d) - {"description", "parameters", "notebooks", "only"}
    if unknown_top:
        raise ProfileError(f"{p}: unknown top-level keys {sorted(unknown_top)} "
                           "(allowed: description, parameters, notebooks, only)")
    return {"parameters": {}, "notebooks": {}, **d, "name": p.stem, "path": str(p)}


def plan(profile: dict, notebooks: list[Path]) -> list[tuple[Path, dict]]:
    """-> [(notebook, parameters to pass)]; raises ProfileError on any unknown key or ill-typed value."""
    declared = {nb.stem: declared_parameters(nb) for nb in notebooks}
    where = profile["path"]
    errors = [f"{nb}.ipynb does not declare 'profile' in its parameters cell"
              for nb, decl in declared.items() if "profile" not in decl]
    all_keys = set().union(*declared.values())
    errors += [f"{where}: parameter {k!r} is declared by no notebook" for k in profile["parameters"]
               if k not in all_keys]
    for nb, over in profile["notebooks"].items():
        if nb not in declared:
            errors.append(f"{where}: notebooks.{nb}: no notebook {nb}.ipynb (have: {', '.join(declared)})")
            continue
        errors += [f"{where}: notebooks.{nb}.{k}: not a parameter of {nb}.ipynb "
                   f"(it declares: {', '.join(declared[nb])})" for k in over or {} if k not in declared[nb]]
    only = profile.get("only")
    errors += [f"{where}: only: no notebook {nb}" for nb in only or () if nb not in declared]
    errors += type_errors(where, profile, declared)
    if errors:
        raise ProfileError("profile does not match the notebooks:\n  " + "\n  ".join(errors))
    out = []
    for nbp in notebooks:
        if only and nbp.stem not in only:
            continue
        params = {k: v for k, v in profile["parameters"].items() if k in declared[nbp.stem]}
        params.update(profile["notebooks"].get(nbp.stem) or {})
        params["profile"] = profile["name"]
        out.append((nbp, params))
    return out


def write_index(reports: Path, profile: dict, ran: list[dict]) -> Path:
    lines = [f"# vitsift reports: profile `{profile['name']}`", "",
             f"{profile.get('description', '')}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", "",
             "| notebook | seconds | model | data |", "|---|---|---|---|"]
    for r in ran:
        lines.append(f"| [{r['notebook']}]({r['notebook']}.ipynb) | {r['seconds']:.1f} | "
                     f"{r['params'].get('model', '-')} | {r['params'].get('images', '-')} |")
    for sub, title in (("figures", "Figures"), ("tables", "Tables")):
        files = sorted((reports / sub).glob("*")) if (reports / sub).exists() else []
        if files:
            lines += ["", f"## {title}", ""]
            lines += [f"- [{f.name}]({sub}/{f.name})" for f in files if f.suffix in (".png", ".md", ".csv")]
    p = reports / "index.md"
    p.write_text("\n".join(lines) + "\n")
    return p


def run(profile_name: str, notebooks: list[Path] | None = None, kernel: str | None = None,
        log_output: bool = False) -> list[dict]:
    """Check the profile against every notebook, then run ``notebooks`` (default all) into reports/."""
    import papermill as pm

    from vitsift_core.report.site import write_html_index   # imports the model package: not for --check

    profile = load_profile(profile_name)
    jobs = plan(profile, notebook_paths())
    if notebooks is not None:
        wanted = {Path(nb).stem for nb in notebooks}
        jobs = [(nb, p) for nb, p in jobs if nb.stem in wanted]
    if not jobs:
        print("no notebooks to run")
        return []
    reports = reports_dir()
    for sub in ("figures", "tables"):
        (reports / sub).mkdir(parents=True, exist_ok=True)
    ran = []
    t_all = time.perf_counter()
    tag = f"[reproduce:{profile['name']}]"
    try:
        for nb, params in jobs:
            print(f"{tag} {nb.name} {json.dumps(params)}", flush=True)
            t0 = time.perf_counter()
            pm.execute_notebook(str(nb), str(reports / nb.name), parameters=params, cwd=str(ROOT),
                                kernel_name=kernel or "python3", progress_bar=False, log_output=log_output)
            dt = time.perf_counter() - t0
            print(f"{tag} {nb.name} done in {dt:.1f} s", flush=True)
            ran.append({"notebook": nb.stem, "seconds": dt, "params": params})
    finally:   # a failed notebook still leaves a readable report of what ran (its copy says where it failed)
        idx = write_index(reports, profile, ran)
        page = write_html_index(reports, profile)
    print(f"{tag} all {len(ran)} notebooks in {time.perf_counter() - t_all:.1f} s; see {idx} or open {page}")
    return ran


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitsift_core.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="embedded")
    ap.add_argument("--check", action="store_true", help="only validate the profile against the notebooks")
    ap.add_argument("--notebook", action="append", help="run only this notebook (stem); repeatable")
    a = ap.parse_args(argv)
    try:
        if a.check:
            for nb, params in plan(load_profile(a.profile), notebook_paths()):
                print(f"{nb.name}: {params}")
        else:
            run(a.profile, a.notebook)
    except ProfileError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.exit(main())
