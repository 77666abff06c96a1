"""Fixture generator: runs the official MaskFreeVIS release on this project's inputs.

See README.md in this folder; `bash tools/official_parity/make_fixtures.sh` regenerates every
fixture under tests/fixtures/.
"""
