-- Per-chat (or per-anything) session rows. A row with data IS NULL is a lock placeholder: it exists so that
-- the first two updates of a new chat serialize on the same row lock instead of both seeing "no session".
CREATE TABLE sessions (
    key        text PRIMARY KEY,
    data       jsonb,
    version    integer NOT NULL DEFAULT 0,
    expires_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_expires_at ON sessions (expires_at) WHERE expires_at IS NOT NULL;

-- update_ids already applied, recorded in the same transaction as the session write. A set, not a
-- high-water mark: Telegram's ids arrive out of order under retries and jump after quiet periods.
CREATE TABLE processed_updates (
    bot_id       bigint NOT NULL,
    update_id    bigint NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_id, update_id)
);
CREATE INDEX processed_updates_processed_at ON processed_updates (processed_at);

-- Bot API calls queued by handlers, written in the update's transaction and sent after the commit.
-- lease_until keeps a second sender (a redelivery, the sweeper) off a call that someone is sending now.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    bot_id      bigint NOT NULL,
    update_id   bigint NOT NULL,
    method      text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    sent_at     timestamptz,
    failed_at   timestamptz
);
CREATE INDEX outbox_update ON outbox (bot_id, update_id);
CREATE INDEX outbox_pending ON outbox (lease_until) WHERE sent_at IS NULL AND failed_at IS NULL;
