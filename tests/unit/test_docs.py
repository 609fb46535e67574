"""The README stays true: every setting documented with its default and option."""

from pathlib import Path

from acexy_tw.config import SETTINGS

README = (Path(__file__).resolve().parents[2] / "README.rst").read_text(encoding="utf-8")


def test_every_setting_is_in_the_readme_with_its_option_and_default():
    for s in SETTINGS:
        for name in s.env_names:
            assert f"``{name}``" in README, name
        assert f"``--{s.option}``" in README, s.option
        shown = f"``{s.default}``" if s.default else "(unset)"
        assert shown in README, (s.env, s.default)


def test_the_two_commands_are_in_the_readme_and_ci_runs_the_test_one():
    assert "./dev run" in README and "./dev test" in README
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "./dev test" in ci
