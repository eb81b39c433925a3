"""``python -m multimail`` is the ``multimail`` command."""

from multimail.cli import app

app(prog_name="multimail")
