"""The `clipa` command: parses arguments, calls the plain-Python core, renders the result."""
