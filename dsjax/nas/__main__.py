"""`python -m dsjax.nas` is `dsjax-search`."""

from dsjax.cli import search_main

if __name__ == "__main__":
  search_main()
