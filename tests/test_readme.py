"""The README's commands cannot drift from the CLI: every `msakit ...` line it shows parses, the
files it names exist, and the cheap ones run as shown (plus tiny sizes and one epoch) in order."""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from msakit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY = ["data.synthetic.train_size=60", "data.synthetic.valid_size=20", "data.synthetic.test_size=20",
        "train.progress=false"]
NEEDS_TEXT = ("configs/psa_mf/", "configs/text_bert/")


def readme_commands(inline: bool = True) -> list[list[str]]:
    """argv of each `msakit` command in the README's bash blocks (continuation lines joined,
    comments dropped, `a && msakit b` split) and, with `inline`, in inline code spans that have
    flags and no placeholder words (COMMAND, NAME, ...)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                if part.strip().startswith("msakit"):
                    commands.append(shlex.split(part.strip())[1:])
    for span in re.findall(r"`(msakit [^`]+)`", text.replace("\n", " ")) if inline else []:
        argv = shlex.split(span)[1:]
        placeholder = any(re.fullmatch(r"[A-Z_]+", a) for a in argv) or "..." in argv
        if any(a.startswith("--") for a in argv) and not placeholder and argv not in commands:
            commands.append(argv)
    return commands


def test_the_readme_shows_the_main_commands():
    firsts = {argv[0] for argv in readme_commands() if argv}
    assert {"train", "eval", "analyze", "personality", "list-models"} <= firsts


def test_every_readme_command_parses_and_names_existing_files():
    parser = build_parser()
    for argv in readme_commands():
        if argv == ["--version"]:
            continue
        args = parser.parse_args(argv)  # an unknown flag exits with status 2
        for name in ("config", "csv"):
            value = getattr(args, name, None)
            if value and not re.search(r"[A-Z]{3,}", value):  # PATH, OUT, MODEL: placeholders
                assert (ROOT / value).is_file(), f"README: msakit {' '.join(argv)}: {value} missing"


def _runnable(argv: list[str]) -> bool:
    text = " ".join(argv)
    if "PATH/" in text or "OUT/" in text or "MODEL" in text or any(p in text for p in NEEDS_TEXT):
        return False
    return "../shared/data" not in text or SHARED.is_dir()


def test_readme_commands_run_as_shown(tmp_path, monkeypatch, capsys):
    """In README order, from a folder with the repository's configs/ and examples/; training gets
    one epoch, one seed and tiny synthetic sizes appended; the personality head a tiny encoder."""
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    ran, missing = [], []  # missing: run folders whose making command could not run here
    for argv in readme_commands(inline=False):
        if not _runnable(argv) or any(path in argv or f"{path}/" in " ".join(argv) for path in missing):
            if "--out" in argv:
                missing.append(argv[argv.index("--out") + 1])
            continue
        argv = [str(SHARED) if a == "../shared/data" else a for a in argv]
        if argv[0] == "--version":
            with pytest.raises(SystemExit) as done:
                main(argv)
            assert done.value.code == 0
            continue
        if argv[0] == "train":
            argv = [*argv, "--epochs", "1", "--seeds", "1", "--set", *TINY]
        if argv[0] == "tune":  # two one-epoch trials, one final seed
            argv = [*argv, "--trials", "2", "--epochs", "1", "--final-seeds", "1", "--set", *TINY]
        if argv[:2] == ["personality", "fit"]:
            pytest.importorskip("transformers")
            argv = [*argv, "--encoder", "tiny", "--epochs", "2"]
        started = time.perf_counter()
        assert main(argv) == 0, f"README: msakit {' '.join(argv)}"
        print(f"{time.perf_counter() - started:.1f} s: {' '.join(argv)}", file=sys.stderr)
        ran.append(argv[0])
    assert ran.count("train") >= 2 and "analyze" in ran
    assert "results:" in capsys.readouterr().out


def test_the_dbr_mosi_poria_reading_quotes_its_compare_json():
    """The prose under the DBR ablation tables restates the BRF gap; it said 0.100 where the
    table's mean difference is 0.0897."""
    import json

    runs = json.loads((ROOT / "benchmarks/results/compare/dbr_mosi-poria_mae/compare.json").read_text())["runs"]
    full, no_brf = runs["dbr"]["mean"], runs["dbr_no_brf"]["mean"]
    found = re.search(r"without it MAE is (\d\.\d+) worse \((\d\.\d+) vs (\d\.\d+),",
                      (ROOT / "README.md").read_text())
    assert found, "the README's DBR BRF sentence moved: update this test"
    gap, a, b = (float(g) for g in found.groups())
    assert (a, b) == (round(full, 3), round(no_brf, 3))
    assert gap == round(no_brf - full, 3)
