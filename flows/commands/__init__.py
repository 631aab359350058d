"""The ``ovseg`` subcommands, one module per group; ``flows.cli`` builds the parser.

``store`` (``cache ls / verify / gc``, ``runs``) and ``tools`` (``ingest``, ``backbones``,
``report``, ``segment``, ``demo``) never start a Prefect server; ``run`` (``run``, ``stage``,
``serve``, ``export``) holds the experiment commands. Every function takes the parsed
arguments and returns the exit code.
"""
