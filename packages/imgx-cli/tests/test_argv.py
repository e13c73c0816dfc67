"""The command-line checks that run before Fire."""

import pytest

from imgx_cli.argv import UsageError, is_flag, normalize_command


def predict(run="runs/latest", input=None, output=None, seed=0, save_probabilities=False):
    """A signature like `imgx predict`'s."""


def build(dataset, manual_dir=None):
    """A signature with a positional argument."""


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["-i", "a", "-o", "b"], ["--input=a", "--output=b"]),
        (["-i=a", "--output=b=c"], ["--input=a", "--output=b=c"]),
        (["--save-probabilities"], ["--save_probabilities=True"]),
        (["--save-probabilities", "false"], ["--save_probabilities=False"]),
        (["--no-save-probabilities"], ["--save_probabilities=False"]),
        (["--nosave_probabilities"], ["--save_probabilities=False"]),
        (["--seed", "-1"], ["--seed=-1"]),
        (["--help", "--bogus"], ["--", "--help"]),
    ],
)
def test_normalized_words(words, expected):
    assert normalize_command("predict", words, predict) == expected


def compare(*runs, output="compare", replace=False):
    """A signature with any number of positional arguments, like `imgx compare`'s."""


def test_any_number_of_positional_arguments():
    words = ["a", "-o", "out", "b", "c", "--replace"]
    assert normalize_command("compare", words, compare) == [
        "--output=out", "--replace=True", "a", "b", "c"
    ]  # fmt: skip
    assert normalize_command("compare", [], compare) == []
    with pytest.raises(UsageError, match="unknown option --runs"):
        normalize_command("compare", ["--runs", "a"], compare)


def test_positional_arguments_follow_the_options():
    assert normalize_command("build", ["x", "-m", "raw"], build) == ["--manual_dir=raw", "x"]
    assert normalize_command("build", ["--dataset", "x"], build) == ["--dataset=x"]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--no-seed"], "unknown option --no-seed"),
        (["--no-save-probabilities=1"], "takes no value"),
        (["-x", "1"], "unknown option -x"),
        (["-s", "1"], "-s is ambiguous"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_rejected_words(words, message):
    with pytest.raises(UsageError, match=message):
        normalize_command("predict", words, predict)


def test_flags_follow_fire():
    assert [is_flag(w) for w in ["--a", "-a", "-a=1", "-1", "-ab", "--", "a"]] == [
        True, True, True, False, False, False, False
    ]  # fmt: skip
