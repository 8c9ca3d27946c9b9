"""The profiling app, `dsjax-profile`: a short training run, then its bottlenecks ranked
(`dsjax.profile.report`). What it measures with is the library `dsjax.measure`."""
