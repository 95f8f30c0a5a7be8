"""environment.yml (conda users) must list exactly what pyproject.toml asks for."""
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    text = (ROOT / "environment.yml").read_text().split("- pip:", 1)[1]  # the pip section, at the end
    pip_lines = [m.group(1).strip() for m in re.finditer(r"^\s+- (.+)$", text, re.M)]
    listed = {_name(r): r for r in pip_lines if not r.startswith(("-e", "python", "pip"))}
    assert set(listed) == set(wanted), f"only in pyproject: {set(wanted) - set(listed)}; only in environment.yml: {set(listed) - set(wanted)}"
    for name, req in wanted.items():
        if name == "torch":  # pyproject states a range; both installers pin the tested CPU build
            assert listed[name] == "torch==2.13.0"
            continue
        assert listed[name].replace(" ", "") == req.replace(" ", ""), f"{name}: {listed[name]} vs {req}"


def test_makefile_pins_the_same_torch_as_environment_yml():
    assert "TORCH  ?= torch==2.13.0" in (ROOT / "Makefile").read_text()
