"""The `salmon` command line: one entry point that dispatches to each package's ``cli.main``, and
the end-to-end demo. The top of the import graph: nothing imports it."""
