"""The anchor: the digits pipeline as a tutorial user writes it by hand with Prefect, PyTorch, scikit-learn and MLflow.

Self-contained on purpose (it imports nothing from ae_repr, evaluation or flows): it is what the default
`ae-repr run` competes with. One Prefect flow, a task per step (load the data, train one model, probe one
model, log one model), called one after another in a plain loop. Six MLP autoencoders on scikit-learn's
digits (pixels / 16; stratified 75/25 train/test split, seed 0): encoder 64-256-k and decoder k-256-64
with ReLU, for k = 4, 8, 16, 32, and two denoising ones at k = 16 and 32 (Gaussian noise of std 0.1 added
to the input, the clean image as the target). Each trains 50 epochs of Adam (lr 1e-3), batch 64, MSE;
then `LogisticRegression(max_iter=1000)` is fitted on the train codes and scored on the test codes.
MLflow: one run per model with its params, final loss and probe accuracy, and the model logged by
`mlflow.pytorch.log_model` with an input example (requirements left to MLflow to infer, as a tutorial
user leaves them). Torch keeps its default threads. Prints each model's accuracy and the total time.

    python benchmarks/handwritten_pipeline.py [--mlflow-uri sqlite:////abs/path/mlflow.db]
"""
# ruff: noqa: E402 - the clock starts and the telemetry switches are set before the libraries load

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the total includes them, as a user's clock would

import argparse
import os
import tempfile

# no network here: the same telemetry switches the project's runs use, set before the libraries load
for _k, _v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_k, _v)

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from prefect import flow, task
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS, BATCH, LR, HIDDEN, NOISE_STD = 50, 64, 1e-3, 256, 0.1
# (name, latent width, denoising)
MODELS = [("ae_k4", 4, False), ("ae_k8", 8, False), ("ae_k16", 16, False), ("ae_k32", 32, False),
          ("dae_k16", 16, True), ("dae_k32", 32, True)]


class Autoencoder(nn.Module):
    """MLP autoencoder: 64-256-k encoder, k-256-64 decoder."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@task
def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], stratified 75/25 split with seed 0."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return tuple(train_test_split(x, y, test_size=0.25, stratify=y, random_state=0))


@task
def train_model(x_train: np.ndarray, latent_dim: int, denoising: bool) -> tuple[Autoencoder, float]:
    """50 epochs of Adam on the MSE; the model and its last epoch's mean loss."""
    torch.manual_seed(0)
    model = Autoencoder(latent_dim)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_train)), batch_size=BATCH, shuffle=True)
    loss_fn = nn.MSELoss()
    for _ in range(EPOCHS):
        total, n = 0.0, 0
        for (xb,) in loader:
            inp = xb + NOISE_STD * torch.randn_like(xb) if denoising else xb
            loss = loss_fn(model(inp), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(xb), n + len(xb)
    return model, total / n


@task
def probe_model(model: Autoencoder, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray) -> float:
    """Logistic regression on the codes: fit on train, accuracy on test."""
    model.eval()
    with torch.no_grad():
        z_train = model.encoder(torch.from_numpy(x_train)).numpy()
        z_test = model.encoder(torch.from_numpy(x_test)).numpy()
    clf = LogisticRegression(max_iter=1000).fit(z_train, y_train)
    return float(clf.score(z_test, y_test))


@task
def log_model(name: str, model: Autoencoder, latent_dim: int, denoising: bool, final_loss: float, accuracy: float,
              x_example: np.ndarray) -> str:
    """One MLflow run: params, the final loss and probe accuracy, and the model with an input example."""
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({"latent_dim": latent_dim, "hidden": HIDDEN, "denoising": denoising,
                           "noise": f"gaussian std {NOISE_STD}" if denoising else "none", "epochs": EPOCHS,
                           "batch_size": BATCH, "lr": LR})
        mlflow.log_metrics({"final_loss": final_loss, "probe_accuracy": accuracy})
        mlflow.pytorch.log_model(model, name=name, input_example=x_example)
    return run.info.run_id


@flow
def handwritten_pipeline() -> dict[str, float]:
    """Load the digits, then train, probe and log each of the six models in turn."""
    x_train, x_test, y_train, y_test = load_data()
    accuracies = {}
    for name, k, denoising in MODELS:
        model, final_loss = train_model(x_train, k, denoising)
        accuracies[name] = probe_model(model, x_train, y_train, x_test, y_test)
        log_model(name, model, k, denoising, final_loss, accuracies[name], x_test[:5])
        print(f"{name}: final loss {final_loss:.4f}, probe accuracy {accuracies[name]:.3f}", flush=True)
    return accuracies


def main() -> None:
    """Parse `--mlflow-uri`, run the flow, print the total time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlflow-uri", help="MLflow tracking URI (default: a SQLite file in a new temp dir)")
    args = ap.parse_args()
    mlflow.set_tracking_uri(args.mlflow_uri or f"sqlite:///{tempfile.mkdtemp(prefix='handwritten-')}/mlflow.db")
    mlflow.set_experiment("handwritten-pipeline")
    handwritten_pipeline()
    print(f"total time: {time.perf_counter() - START:.1f} s", flush=True)


if __name__ == "__main__":
    main()
