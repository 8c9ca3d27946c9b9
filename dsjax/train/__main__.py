"""`python -m dsjax.train` is `dsjax-train`."""

from dsjax.cli import train_main

if __name__ == "__main__":
  train_main()
