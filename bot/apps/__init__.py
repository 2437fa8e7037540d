"""Apps built on the framework that ship with this distribution. The framework never imports them: `serve`
and `poll` load one by name (`--app module:factory`, or the APP setting)."""
