import re

import pytest

from tolaria_otel import SeedLayerSettings, SettingsError
from tolaria_otel.config.settings import (
    ENV_COMPACT,
    ENV_ENABLED,
    ENV_EXPORT_RANK,
    ENV_MAX_SEEDS,
    ENV_SAMPLE_EVERY,
    ENV_STEP_NORM_HISTOGRAM,
    ENV_TOP_K,
)


def test_defaults_with_nothing_set():
    assert SeedLayerSettings.from_env({}) == SeedLayerSettings(enabled=False, top_k=3, compact=False, sample_every=1)


@pytest.mark.parametrize("raw", ["true", "TRUE", "True", "1", "yes", "On", "  on  ", "t", "T", "y", "Y"])
def test_bool_true_spellings(raw):
    assert SeedLayerSettings.from_env({ENV_ENABLED: raw}).enabled is True


@pytest.mark.parametrize("raw", ["false", "FALSE", "0", "no", "Off", " off\t", "f", "F", "n", "N"])
def test_bool_false_spellings(raw):
    assert SeedLayerSettings.from_env({ENV_ENABLED: raw}).enabled is False


WORDS = [
    "1",
    "0",
    "true",
    "false",
    "t",
    "f",
    "yes",
    "no",
    "y",
    "n",
    "on",
    "off",
    "2",
    "-1",
    "tru",
    "yess",
    "enabled",
    "none",
    "null",
    "",
    "oui",
    "１",
    "1.0",
    "0.0",
]


@pytest.mark.parametrize("name", [ENV_ENABLED, ENV_COMPACT])
@pytest.mark.parametrize("word", [w for word in WORDS for w in dict.fromkeys([word, word.upper(), word.capitalize()])])
def test_bool_grammar_is_esper_settings_own(name, word):
    """Esper's settings read these flags as pydantic booleans: whatever pydantic takes, the package takes the
    same way, and whatever it refuses, the package refuses (a blank value is unset in both)."""
    pydantic = pytest.importorskip("pydantic")  # a test dependency: never skipped in CI
    try:
        expected = pydantic.TypeAdapter(bool).validate_python(word)
    except pydantic.ValidationError:
        expected = None
    if not word.strip():
        assert SeedLayerSettings.from_env({name: word}) == SeedLayerSettings()
    elif expected is None:
        with pytest.raises(SettingsError, match=name):
            SeedLayerSettings.from_env({name: word})
    else:
        field = "enabled" if name == ENV_ENABLED else "compact"
        assert getattr(SeedLayerSettings.from_env({name: word}), field) is expected


@pytest.mark.parametrize("name", [ENV_ENABLED, ENV_COMPACT, ENV_TOP_K, ENV_SAMPLE_EVERY])
@pytest.mark.parametrize("raw", ["", " ", "\t\n"])
def test_empty_or_blank_counts_as_unset(name, raw):
    assert SeedLayerSettings.from_env({name: raw}) == SeedLayerSettings()


@pytest.mark.parametrize("name", [ENV_ENABLED, ENV_COMPACT])
@pytest.mark.parametrize("raw", ["-1", "3.5", "abc", "2", "tru", "yy", "enabled", "１"])
def test_bad_bool_names_variable_value_and_accepted(name, raw):
    with pytest.raises(
        SettingsError, match="^" + re.escape(f"{name}={raw!r} is not valid: expected one of 1/true/t/yes/y/on")
    ):
        SeedLayerSettings.from_env({name: raw})


@pytest.mark.parametrize(
    ("name", "maximum"), [(ENV_TOP_K, 1_000_000), (ENV_SAMPLE_EVERY, 1_000_000), (ENV_MAX_SEEDS, 1_000_000)]
)
@pytest.mark.parametrize("raw", ["0", "-1", "3.5", "abc", "+3", "1_0", "1e3", "0x10", "٣", "9" * 40])
def test_bad_int_names_variable_value_and_accepted(name, maximum, raw):
    with pytest.raises(
        SettingsError,
        match="^" + re.escape(f"{name}={raw!r} is not valid: expected an integer from 1 to {maximum}") + "$",
    ):
        SeedLayerSettings.from_env({name: raw})


@pytest.mark.parametrize(("raw", "expected"), [("1", 1), (" 7 ", 7), ("007", 7), ("100", 100), ("5000", 5000)])
def test_top_k_accepted(raw, expected):
    assert SeedLayerSettings.from_env({ENV_TOP_K: raw}).top_k == expected


def test_sample_every_and_compact_read():
    settings = SeedLayerSettings.from_env({ENV_SAMPLE_EVERY: "4", ENV_COMPACT: "yes", ENV_ENABLED: "1"})
    assert (settings.sample_every, settings.compact, settings.enabled) == (4, True, True)
    assert settings.emits_layers is False


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


def test_immutable_and_validated_in_code():
    settings = SeedLayerSettings()
    with pytest.raises(AttributeError):
        settings.top_k = 5  # type: ignore[misc]
    with pytest.raises(SettingsError, match=r"^top_k=0 is not valid"):
        SeedLayerSettings(top_k=0)
    with pytest.raises(SettingsError, match=r"^top_k=True is not valid"):
        SeedLayerSettings(top_k=True)
    with pytest.raises(SettingsError, match=r"^enabled='yes' is not valid: expected a bool"):
        SeedLayerSettings(enabled="yes")  # type: ignore[arg-type]
    assert settings.replace(top_k=5).top_k == 5


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv(ENV_ENABLED, "on")
    monkeypatch.setenv(ENV_TOP_K, "5")
    assert SeedLayerSettings.from_env() == SeedLayerSettings(enabled=True, top_k=5)


@pytest.mark.parametrize("name", [ENV_ENABLED, ENV_COMPACT, ENV_TOP_K, ENV_SAMPLE_EVERY, ENV_EXPORT_RANK])
def test_a_100_kB_value_gives_a_short_message_with_its_length(name):
    with pytest.raises(SettingsError) as raised:
        SeedLayerSettings.from_env({name: "7" * 100_000 + "x"})
    message = str(raised.value)
    assert len(message) < 200 and message.startswith(f"{name}='7777") and "... (100001 characters)" in message


def test_a_long_field_value_in_code_is_cut_too():
    with pytest.raises(SettingsError, match=r"^top_k=\[0, 0, .*\.\.\. \(30000 characters of repr\) is not valid"):
        SeedLayerSettings(top_k=[0] * 10_000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"), [("coarse", "coarse"), (" FINE ", "fine"), ("Off", "off"), ("", "coarse")]
)
def test_step_norm_histogram_accepted(raw, expected):
    assert SeedLayerSettings.from_env({ENV_STEP_NORM_HISTOGRAM: raw}).step_norm_histogram == expected


@pytest.mark.parametrize("raw", ["none", "0", "4", "fine,coarse", "decades"])
def test_bad_step_norm_histogram_names_variable_value_and_accepted(raw):
    with pytest.raises(
        SettingsError,
        match="^"
        + re.escape(f"{ENV_STEP_NORM_HISTOGRAM}={raw!r} is not valid: expected one of coarse, fine, off (any case)")
        + "$",
    ):
        SeedLayerSettings.from_env({ENV_STEP_NORM_HISTOGRAM: raw})
