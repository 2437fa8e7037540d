"""A Telegram webhook bot with exactly-once, per-chat sessions in PostgreSQL."""
