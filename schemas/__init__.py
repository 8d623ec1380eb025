"""The bottom layer: what the Beam job, the trainer and the orchestration all agree on.

Feature configs (one YAML file per dataset) and the bundled sample data; the typed config
(`config`) and its loader (`loading.load_config("taxi")`: a bundled config by name, or any path);
the run directory (`layout`) and its manifest (`manifest`); the feature specs of the examples
(`features`), the tables' sizes and row keys (`tables`), and the errors that mean bad input
(`errors`). Nothing here imports `pipeline/`,
`trainer/` or `embedpipe/` (see the README's "Code layout").
"""
