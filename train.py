"""Entry point: `python train.py fit|validate|test|count|propagate|search|sweep|noise --config configs/X.yaml`."""

from lightning_modules.run.cli import main

if __name__ == "__main__":
    main()
