"""`python -m train ...` and `torchrun ... -m train ...`."""

from train.cli import train

if __name__ == "__main__":
    train()
