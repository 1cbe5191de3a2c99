"""The `lcsm` command line (entry point: lcsm.cli.main:main)."""
