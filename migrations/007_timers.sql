-- Durable timers (bot/timers.py): work a handler scheduled for later, inserted in its update's
-- transaction (a rolled-back update schedules nothing) and fired once, by any process, in a transaction
-- of its own that deletes the row (so a fire that commits can never run again).
--
-- key + name identify a timer within a bot: scheduling the same pair again replaces it, and the
-- replacement gets a new id (id = DEFAULT), so a process that picked the old one can no longer claim it.
-- origin is the chat, sender and topic of the update that scheduled it (a Bot API Message, text-less),
-- from which the fire's sessions are keyed and its replies addressed. lease_until keeps other processes
-- off a timer one process has picked and is about to fire; a process that dies leaves it to the others
-- when the lease runs out. A timer whose handler failed is kept with failed_at set, fired no more.
CREATE TABLE timers (
    id          bigserial PRIMARY KEY,
    bot_id      bigint NOT NULL,
    key         text NOT NULL,
    name        text NOT NULL,
    handler     text NOT NULL,
    payload     jsonb NOT NULL,
    origin      jsonb NOT NULL,
    due_at      timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    failed_at   timestamptz,
    last_error  text,
    UNIQUE (bot_id, key, name)
);
-- What the firing loop scans: the due timers of a bot, earliest first.
CREATE INDEX timers_due ON timers (bot_id, due_at, id) WHERE failed_at IS NULL;
