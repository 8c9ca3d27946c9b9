"""`python -m dsjax.data` is `dsjax-data`."""

from dsjax.cli import data_main

if __name__ == "__main__":
  data_main()
