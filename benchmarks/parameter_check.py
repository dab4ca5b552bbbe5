"""What following parameters replaced inside a seed module costs on the step path: each seed's parameters
are walked once every ``PARAMETER_CHECK_EVERY`` sampled steps, a share of the seeds at each step
(``SeedTracker.follow_replaced_parameters``). Times that call alone at every step of two rounds,
median and slowest, next to the walk over every seed at once. ``python -m benchmarks.parameter_check``
(``--quick``: the two small sizes, for tests/test_benchmarks.py)."""

import argparse
import time

from torch import nn

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.measure.seed_tracker import PARAMETER_CHECK_EVERY, seeds_with_new_parameters


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="only 4x3 and 64x20")
    sizes = [(4, 3), (64, 20)] if parser.parse_args().quick else [(4, 3), (64, 20), (256, 20), (2000, 1)]
    print(f"parameter check, one seed share per sampled step (PARAMETER_CHECK_EVERY={PARAMETER_CHECK_EVERY})")
    for seeds, layers in sizes:
        model = nn.ModuleDict({f"s{i}": nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)]) for i in range(seeds)})
        registry = {f"s{i}": (model[f"s{i}"], "TRAINING") for i in range(seeds)}
        telemetry = SeedLayerTelemetry(
            model, registry, settings=SeedLayerSettings(enabled=True), attributes={"benchmark": f"{seeds}x{layers}"}
        )
        per_step = []
        for step in range(2 * PARAMETER_CHECK_EVERY):
            start = time.perf_counter()
            telemetry._seeds.follow_replaced_parameters(step + 1)
            per_step.append(time.perf_counter() - start)
        start = time.perf_counter()
        seeds_with_new_parameters(telemetry._seeds.current, telemetry._seeds.current.modules)
        whole = time.perf_counter() - start
        telemetry.close()
        print(
            f"  {seeds}x{layers} ({seeds * layers * 2} tensors): per step median {_median(per_step) * 1e6:.1f} us, "
            f"slowest {max(per_step) * 1e6:.1f} us; every seed at once {whole * 1e6:.0f} us"
        )


if __name__ == "__main__":
    main()
