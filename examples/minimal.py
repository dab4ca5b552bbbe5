"""A minimal run of the feature: two seeds, three epochs, summaries printed (until the demo lands)."""

import os

import torch

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
from tolaria_otel.seeded_mlp import SeededMLP, SeedRegistry

os.environ.setdefault("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "true")
os.environ.setdefault("OTEL_METRICS_EXPORTER", "none")

torch.manual_seed(0)
model, kasmina = SeededMLP(), SeedRegistry()
for seed_id in ("seed-a", "seed-b"):
    kasmina.add(seed_id, model.graft(seed_id.replace("-", "_")), "TRAINING")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
settings = SeedLayerSettings.from_env()
provider = configure_meter_provider(settings)
telemetry = SeedLayerTelemetry(model, kasmina, settings=settings, meter_provider=provider)
telemetry.attach(optimizer)
for epoch in range(3):
    for _ in range(16):
        x, y = torch.randn(32, 32), torch.randn(32, 10)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    print(telemetry.end_epoch())
telemetry.close()
provider.shutdown()
