"""Orchestration, the top layer: the `embedpipe` command, versioned runs and publishing.

`embedpipe.cli` is the command; `embedpipe.stages` runs the stages (`pipeline/` for the Beam job,
`trainer/` for training and export) into a run directory, and `embedpipe.runs` publishes it.
Nothing below this package imports it; see the README's "Code layout".
"""
