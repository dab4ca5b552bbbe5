"""``tolaria-otel doctor``: show every variable this package reads, check the ones in force, report.

The checks themselves are in ``doctor_checks``; this module reads the settings one variable at a time
(so that each bad one is reported), prints the table and the summary lines, and sets the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..config import otel_env as otel
from ..config.environment import ENDPOINT_VARIABLES
from ..config.environment import value as env_value
from ..config.redaction import HEADER_VARIABLES, MASK, redact, redacted_url, secrets_in
from ..config.settings import ENV_ENABLED, VARIABLE_FIELDS, SeedLayerSettings, SettingsError
from .common import PROG, or_none
from .doctor_checks import check_otlp, check_pull_mode, volume_estimate, volume_problems
from .doctor_variables import OTEL_DEFAULTS, InForce

#: Characters of a value ``doctor`` shows; a longer one is cut.
SHOWN_MAX = 60
#: ``doctor``'s last line when the feature is off: not a problem (exit 0), but not "all is well" either.
FEATURE_OFF = f"nothing will be measured: {ENV_ENABLED} is off (set {ENV_ENABLED}=true to measure)"


def run_doctor_command(args: argparse.Namespace) -> int:
    env = os.environ
    problems: list[str] = []
    good = {}
    for name in VARIABLE_FIELDS:  # one variable at a time, so that each bad one is reported
        try:
            SeedLayerSettings.from_env({name: env.get(name, "")})
            good[name] = env.get(name, "")
        except SettingsError as error:
            problems.append(str(error))
    settings = SeedLayerSettings.from_env(good)  # the bad ones at their defaults
    problems += [str(error) for error in otel.environment_problems(env)]
    in_force = InForce.read(env)

    print(f"{PROG} {__version__}")
    defaults = SeedLayerSettings()
    rows = [(name, _format(getattr(defaults, field))) for name, field in VARIABLE_FIELDS.items()]
    for name, default in [*rows, *OTEL_DEFAULTS.items()]:
        raw = env_value(env, name)
        where = "(default)" if raw is None else f"(env; default: {default})"
        unused = in_force.unused(name, settings)
        print(
            f"  {name:<40} {default if raw is None else _shown(name, raw)}  {where}"
            + (f"  not used: {unused}" if unused else "")
        )

    print(
        f"feature: {'on' if settings.enabled else 'off'}"
        + (", compact" if settings.compact else "")
        + f"; exporters: {', '.join(in_force.exporters) or 'none'}"
        + (f" ({in_force.protocol})" if "otlp" in in_force.exporters and in_force.protocol else "")
    )
    print(volume_estimate(settings, args.seeds, args.layers, in_force))
    problems += volume_problems(settings, args.seeds)
    if in_force.disabled:
        print(f"{otel.ENV_SDK_DISABLED}=true: nothing is exported")
    else:
        problems += check_otlp(env, settings, in_force, args.timeout)
        problems += check_pull_mode(env, in_force)

    # A second guard: a problem's text that comes from a library (an OSError) is masked too.
    secrets = secrets_in(env, fragments=False)
    for problem in problems:
        print(f"{PROG} doctor: {redact(problem, secrets)}", file=sys.stderr)
    if not settings.enabled:
        print(FEATURE_OFF if not problems else f"{len(problems)} problem(s); {FEATURE_OFF}")
    else:
        print(f"{len(problems)} problem(s)" if problems else "all is well")
    return 1 if problems else 0


def _shown(name: str, raw: str) -> str:
    """A value as ``doctor`` prints it: header values and URL secrets masked, long values cut."""
    if name in HEADER_VARIABLES:
        # The names as the exporter will send them (parsed as it parses them), and only from a valid list: in
        # an invalid one, what looks like a name may be the end of a value ('authorization=Basic X,Y==').
        headers = or_none(lambda: otel.otlp_headers({name: raw}))
        if headers is None:
            return f"{MASK} (not valid, not shown)"
        text = ",".join(f"{header}={MASK}" for header in headers) or MASK
    else:
        text = redacted_url(raw) if name in ENDPOINT_VARIABLES else raw
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX]}... ({len(text)} characters)"


def _format(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
