"""Pull mode (``OTEL_METRICS_EXPORTER=prometheus``): what one scrape of the trainer's ``/metrics`` shows.

A real provider from the environment serving on a free loopback port, real training, real scrapes
over HTTP parsed with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections import Counter

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import seeded_network, train_epoch
from tolaria_otel import ConfigurationError, SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
from tolaria_otel.export.provider import metrics_urls

TOP_K = 2
SEEDS = 4
STAGES = ("GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY")
LAYERS = ("net.0", "net.2", "net.4")


@pytest.fixture
def pull_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
    return monkeypatch


def scrape(url: str) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    """The text of one scrape and its samples per metric name."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return text, samples


def test_one_scrape_shows_exactly_the_latest_epoch_after_a_flush_per_epoch(pull_env: pytest.MonkeyPatch) -> None:
    settings = SeedLayerSettings(enabled=True, top_k=TOP_K)
    provider = configure_meter_provider(settings)
    (url,) = metrics_urls(provider)
    model, registry = seeded_network(SEEDS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=provider)
    generator = torch.Generator().manual_seed(0)
    try:
        for epoch in range(5):
            # A new stage for every seed and a new loudest layer every epoch: each epoch has series of its own.
            for index, seed_id in enumerate(registry.stages):
                registry.stages[seed_id] = STAGES[(epoch + index) % len(STAGES)]
            loud = LAYERS[epoch % len(LAYERS)]

            def observe(loud: str = loud) -> None:
                for module in registry.modules.values():
                    module.get_parameter(f"{loud}.weight").grad.mul_(1000.0)
                telemetry.observe_step()

            train_epoch(model, optimizer, steps=2, generator=generator, before_step=observe)
            summary = telemetry.end_epoch()
            provider.force_flush()  # as the demo and close() do

        text, samples = scrape(url)
        expected_layers = {
            (seed_id, seed.stage, layer) for seed_id, seed in summary.seeds.items() for layer, _ in seed.top_layers
        }
        layer_rows = [
            (labels["seed_id"], labels["stage"], labels["layer"])
            for labels, _ in samples["tolaria_grad_agg_seed_layer_norm"]
        ]
        assert len(layer_rows) == TOP_K * SEEDS and set(layer_rows) == expected_layers
        seed_rows = [(labels["seed_id"], labels["stage"]) for labels, _ in samples["tolaria_grad_agg_seed_norm"]]
        assert sorted(seed_rows) == sorted((seed_id, seed.stage) for seed_id, seed in summary.seeds.items())
        assert [value for _, value in samples["tolaria_grad_agg_seed_layer_series_budget"]] == [TOP_K * SEEDS]
        assert len(samples["tolaria_grad_agg_seed_layer_info"]) == 1
        type_lines = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
        assert max(type_lines.values()) == 1, type_lines  # every family once, not once per queued snapshot
        assert scrape(url)[1] == samples  # a second scrape: the same snapshot
    finally:
        telemetry.close()
        provider.shutdown()


def test_scrapes_during_training_each_show_one_whole_snapshot(pull_env: pytest.MonkeyPatch) -> None:
    """Prometheus scrapes on its own schedule, so scrapes land while the training thread flushes."""
    settings = SeedLayerSettings(enabled=True, top_k=TOP_K)
    provider = configure_meter_provider(settings)
    (url,) = metrics_urls(provider)
    model, registry = seeded_network(SEEDS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=provider)
    generator = torch.Generator().manual_seed(1)
    scrapes: list[tuple[str, dict[str, list[tuple[dict[str, str], float]]]]] = []
    done = threading.Event()

    def scrape_until_done() -> None:
        while not done.is_set():
            scrapes.append(scrape(url))

    scraper = threading.Thread(target=scrape_until_done)
    try:
        train_epoch(model, optimizer, steps=1, generator=generator, before_step=telemetry.observe_step)
        telemetry.end_epoch()
        scraper.start()
        for epoch in range(1, 12):
            for index, seed_id in enumerate(registry.stages):
                registry.stages[seed_id] = STAGES[(epoch + index) % len(STAGES)]
            train_epoch(model, optimizer, steps=1, generator=generator, before_step=telemetry.observe_step)
            telemetry.end_epoch()
            provider.force_flush()
    finally:
        done.set()
        if scraper.is_alive():
            scraper.join()
        telemetry.close()
        provider.shutdown()
    assert scrapes
    for text, samples in scrapes:
        layers = samples["tolaria_grad_agg_seed_layer_norm"]
        assert len(layers) == TOP_K * SEEDS and len({labels["stage"] for labels, _ in layers}) <= len(STAGES)
        stages = {labels["seed_id"]: labels["stage"] for labels, _ in samples["tolaria_grad_agg_seed_norm"]}
        assert len(samples["tolaria_grad_agg_seed_norm"]) == SEEDS == len(stages)  # one epoch's stages, not two
        assert all(stages[labels["seed_id"]] == labels["stage"] for labels, _ in layers)
        type_lines = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
        assert max(type_lines.values()) == 1, type_lines


def test_a_second_provider_on_the_same_port_names_the_variable(pull_env: pytest.MonkeyPatch) -> None:
    first = configure_meter_provider(SeedLayerSettings(enabled=True))
    try:
        port = metrics_urls(first)[0].rsplit(":", 1)[1].split("/")[0]
        pull_env.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", port)
        with pytest.raises(ConfigurationError, match=rf"^OTEL_EXPORTER_PROMETHEUS_PORT={port} is not usable: .*in use"):
            configure_meter_provider(SeedLayerSettings(enabled=True))
    finally:
        first.shutdown()


def test_two_providers_on_two_ports_each_serve_their_own_series(pull_env: pytest.MonkeyPatch) -> None:
    providers = [configure_meter_provider(SeedLayerSettings(enabled=True, top_k=k)) for k in (1, 2)]
    try:
        for top_k, provider in zip((1, 2), providers):
            seed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            telemetry = SeedLayerTelemetry(
                seed,
                {f"k{top_k}": (seed, "TRAINING")},
                settings=SeedLayerSettings(enabled=True, top_k=top_k),
                meter_provider=provider,
            )
            seed(torch.ones(1, 2)).sum().backward()
            telemetry.observe_step()
            telemetry.end_epoch()
        for top_k, provider in zip((1, 2), providers):
            (url,) = metrics_urls(provider)
            layers = scrape(url)[1]["tolaria_grad_agg_seed_layer_norm"]
            assert {labels["seed_id"] for labels, _ in layers} == {f"k{top_k}"} and len(layers) == top_k
    finally:
        for provider in providers:
            provider.shutdown()


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])  # unresolvable; not this machine's
def test_an_unusable_host_names_the_variable(pull_env: pytest.MonkeyPatch, host: str) -> None:
    pull_env.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", host)
    with pytest.raises(ConfigurationError, match=rf"^OTEL_EXPORTER_PROMETHEUS_HOST='{host}'"):
        configure_meter_provider(SeedLayerSettings(enabled=True))


def test_a_port_in_use_by_another_program_names_the_variable(pull_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        pull_env.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(other.getsockname()[1]))
        with pytest.raises(ConfigurationError, match=r"^OTEL_EXPORTER_PROMETHEUS_PORT=\d+ is not usable: .*in use"):
            configure_meter_provider(SeedLayerSettings(enabled=True))
