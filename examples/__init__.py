"""Example apps built on the framework, run with `python -m bot serve --app examples.<name>:build_bot`."""
