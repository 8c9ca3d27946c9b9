"""`python -m dsjax.profile` is `dsjax-profile`."""

from dsjax.cli import profile_main

if __name__ == "__main__":
  profile_main()
