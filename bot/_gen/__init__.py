"""The Bot API schema (api.json) and the generator of bot/types.py, bot/methods.py, bot/kinds.py."""
