"""The experiment files: `get_config(arg=None)` per file, loaded by path with
`--config FILE[:variant]`. Installed as `dsjax.configs`, so `--model NAME` finds its
default file in any installation."""
