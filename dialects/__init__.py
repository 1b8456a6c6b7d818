"""The shipped dialects, one module per vendor API Dialgate speaks. They are
registered in the `dialgate.dialects` entry-point group (pyproject.toml) and
found there by `gateway.registry`, as a plug-in's would be."""
