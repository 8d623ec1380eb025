"""Feature configs (one YAML file per dataset), the bundled sample data, and the typed config.

`schemas.config.load_config("taxi")` loads a bundled config by name; any path works too.
"""
