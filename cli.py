"""Entry point: ``python cli.py fit --config configs/...`` (same as the ``htc-lightning`` command)."""
from htc_lightning.cli import main

if __name__ == "__main__":
    main()
