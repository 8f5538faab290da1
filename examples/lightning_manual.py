"""ULR inside a PyTorch Lightning ``LightningModule``, with manual optimisation.

Lightning's automatic optimisation calls ``loss.backward()`` for you; ULR has no backward pass, so
the module sets ``automatic_optimization = False`` and its ``training_step`` does what
``manual_backward`` would: ``est.loss_and_grads(...)`` writes every ``p.grad``, then the optimizer
steps. Everything else of Lightning (loggers, callbacks, checkpoints, validation) works as usual.

    pip install lightning                      # or: pip install 'ulr[integrations]'
    python examples/lightning_manual.py         # digits MLP, 20 epochs, ~97% test accuracy
    python examples/lightning_manual.py --smoke # a few steps, for CI
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ulr


def row_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One loss per row (ULR weights each noisy copy by its own loss); never differentiated."""
    return F.cross_entropy(logits, y, reduction="none")


class ULRClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3, num_copies: int = 32) -> None:
        super().__init__()
        self.automatic_optimization = False  # ULR writes the gradients itself
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.est: ulr.LikelihoodRatio | None = None

    def on_fit_start(self) -> None:
        # The noise generator lives on the model's device; seeded for reproducible runs.
        gen = torch.Generator(device=self.device).manual_seed(0)
        self.est = ulr.LikelihoodRatio(self.net, num_copies=self.hparams.num_copies,
                                       generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.est.loss_and_grads(row_loss, x, y)  # instead of self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a few steps only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = ulr.data.load("digits", seed=0)
    train = DataLoader(TensorDataset(*data.train), batch_size=32, shuffle=True)
    test = DataLoader(TensorDataset(*data.test), batch_size=512)
    model = ULRClassifier()
    trainer = L.Trainer(max_epochs=1 if args.smoke else args.epochs, accelerator="cpu",
                        limit_train_batches=3 if args.smoke else None,
                        logger=False, enable_checkpointing=False,
                        enable_progress_bar=not args.smoke, enable_model_summary=False)
    trainer.fit(model, train, test)
    print(f"test accuracy {trainer.validate(model, test, verbose=False)[0]['val_acc']:.3f}")


if __name__ == "__main__":
    main()
