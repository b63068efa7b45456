"""The train command line is generated from Config's fields: a field is an option, with its
help, group, default and choices, without any change to keras_local/cli."""

import dataclasses
from typing import Optional

import pytest

from keras_local.cli import train
from keras_local.config import Config, option

from helpers import help_text

# Config fields that are not command-line options: set by the run itself.
NOT_OPTIONS = {"class_names"}  # found by the folder scan, kept for the export


@dataclasses.dataclass
class WarmupConfig(Config):
    warmup_epochs: int = option(5, "epochs of linear learning-rate warm-up", "optimisation")
    schedule: str = option("step", "learning-rate schedule", "optimisation",
                           choices=("step", "cosine"))
    label_smoothing: Optional[float] = option(None, "label smoothing (default: none)",
                                              "extras")
    ema: bool = option(True, "no exponential moving average of the weights", "extras")
    scales: tuple[float, ...] = option((0.5, 1.0), "input scales", "extras")
    note: str = "plain"  # a field declared without option()


def test_a_field_added_to_a_config_subclass_is_an_option():
    text = help_text(train.make_parser(WarmupConfig))
    assert ("--warmup-epochs WARMUP_EPOCHS epochs of linear learning-rate warm-up "
            "(default: 5)") in text
    assert "--schedule {step,cosine} learning-rate schedule (default: step)" in text
    assert "extras: --label-smoothing LABEL_SMOOTHING label smoothing (default: none)" in text
    assert "--no-ema no exponential moving average of the weights" in text
    assert "--scales SCALES [SCALES ...] input scales (default: 0.5 1.0)" in text
    assert "other options: --note NOTE (default: plain)" in text
    assert "--warmup-epochs" not in help_text(train.make_parser())

    argv = ["--warmup-epochs", "2", "--schedule", "cosine", "--label-smoothing", "0.1",
            "--no-ema", "--scales", "1", "2", "--note", "x", "--recipe", "none"]
    values = train.config_values(train.parse_args(argv, WarmupConfig), WarmupConfig)
    config = WarmupConfig(**values)
    assert (config.warmup_epochs, config.schedule, config.label_smoothing, config.ema,
            config.scales, config.note) == (2, "cosine", 0.1, False, (1.0, 2.0), "x")
    assert train.explicit_options(argv, WarmupConfig) >= {"warmup_epochs", "ema", "scales"}
    defaults = train.config_values(train.parse_args(["--recipe", "none"], WarmupConfig),
                                   WarmupConfig)
    assert WarmupConfig(**defaults) == WarmupConfig()


def test_a_subclass_choice_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--schedule", "linear"], WarmupConfig)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'linear'" in err and "choose from 'step', 'cosine'" in err


def test_a_field_without_a_command_line_form_is_named():
    @dataclasses.dataclass
    class OddConfig(Config):
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="Config field table: no command-line form"):
        train.make_parser(OddConfig)


@pytest.mark.parametrize("field", dataclasses.fields(Config), ids=lambda field: field.name)
def test_every_config_field_is_an_option_with_its_default(field):
    text = help_text(train.make_parser())
    text = text[text.index("show this help message and exit"):]  # the options, not usage
    if field.name in NOT_OPTIONS:
        assert field.metadata["cli"] is False
        assert train.option_flag(field) not in text
        return
    flag = train.option_flag(field)
    assert f" {flag} " in text or f" {flag}," in text, flag
    default = field.default
    if isinstance(default, bool) or default in (None, ()):
        return  # a switch, or "not given" told by the help itself
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
    section = text[text.index(f" {flag} "):]
    section = section[:section.index(" --", 3)] if " --" in section[3:] else section
    assert f"(default: {shown}" in section, (flag, section)


def test_parsed_defaults_are_the_config_defaults():
    args = train.parse_args(["--recipe", "none"])
    assert Config(**train.config_values(args)) == Config()
    switched = train.parse_args(["--no-jit", "--no-batch-norm", "--no-similarity-std",
                                 "--plugin", "a", "--plugin", "b"])
    assert (switched.jit_compile, switched.batch_norm, switched.similarity_std) == \
        (False, False, False)
    assert train.config_values(switched)["plugins"] == ("a", "b")
    assert train.explicit_options(["--recipe", "none"]) == {"recipe"}
