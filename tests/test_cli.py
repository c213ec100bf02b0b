import subprocess
import sys

from typer.testing import CliRunner

from moerge.cli import app

runner = CliRunner()


def write_recipe(tmp_path, tiny, method="ties", extra=""):
    text = (f"merge_method: {method}\nbase_model: {tiny['base']}\nmodels:\n"
            f"  - model: {tiny['ft1']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {tiny['ft2']}\n    parameters: {{weight: 0.5, density: 0.5}}\n" + extra)
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_merge_dry_run_and_merge(tiny, tmp_path):
    recipe = write_recipe(tmp_path, tiny)
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "output tensors:" in res.output and not (tmp_path / "out").exists()
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors").exists()
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 1 and "already exists" in res.output


def test_bad_input_is_one_error_line_and_exit_1(tiny, tmp_path):
    recipe = write_recipe(tmp_path, tiny, extra="parameters: {lambda: oops}\n")
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "merge", str(recipe), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "parameters.lambda" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "merge", str(tmp_path / "none.yaml"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no such recipe file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "demo", "--skills", "reverse,nope", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --skills: nope;"), proc.stderr
    for skills, what in (("reverse", "--skills: give at least two"), ("reverse,reverse_uppercase", "--skills: reverse_uppercase;")):
        res = runner.invoke(app, ["demo", "--skills", skills, "--out", str(tmp_path / "d")])  # the same path, in-process
        assert res.exit_code == 1 and res.output.startswith(f"error: {what}"), res.output
    assert not (tmp_path / "d").exists()


def test_methods_and_help():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "dare_ties" in res.output and "model_stock" in res.output
    for cmd in ("merge", "methods", "demo", "eval", "generate", "base build", "base path", "expert train", "expert gate",
                "expert extract", "expert combine", "expert show", "tasks list", "tasks export", "library init",
                "library add", "library list", "library show", "library export", "library rm", "library verify",
                "library gc", "library push", "library pull", "route list", "route eval"):
        assert runner.invoke(app, [*cmd.split(), "--help"]).exit_code == 0




def test_error_lines_keep_brackets(tmp_path):
    """Messages name extras such as moerge[lorahub] and paths with brackets: printed as they are."""
    folder = tmp_path / "run[lorahub]"
    res = CliRunner().invoke(app, ["route", "eval", "--router", "oracle", "--experts", str(folder)])
    assert res.exit_code == 1 and "run[lorahub]" in res.output
    res = CliRunner().invoke(app, ["generate", "[abc]: x=", "--router", "uniform", "--experts", str(tmp_path / "nope[embed]")])
    assert res.exit_code == 1 and "nope[embed]" in res.output


def test_an_error_no_command_foresaw_is_one_line_and_the_traceback_is_on_request(monkeypatch, capsys):
    """Whatever escapes a command ends as one line naming the real error (exit 1), not a traceback of the
    handler; MOERGE_DEBUG=1 lets it through. The first command that hit this: `moerge serve --port 99999`
    before ports were checked (here a fault planted in the server's start)."""
    import pytest

    import moerge.serve
    from moerge.cli import main

    def boom(**kw):
        raise OverflowError("bind(): port must be 0-65535")

    monkeypatch.setattr(moerge.serve, "serve", boom)
    monkeypatch.setattr(sys, "argv", ["moerge", "serve"])
    monkeypatch.delenv("MOERGE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error: OverflowError: bind(): port must be 0-65535" in err and "MOERGE_DEBUG=1" in err
    monkeypatch.setenv("MOERGE_DEBUG", "1")
    with pytest.raises(OverflowError):
        main()
    res = subprocess.run([sys.executable, "-m", "moerge.cli", "serve", "--port", "99999"], capture_output=True, text=True)
    assert res.returncode == 1 and "--port 99999" in res.stderr and "Traceback" not in res.stderr
