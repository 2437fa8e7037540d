-- Updates whose handling failed for good (a bug in the bot's code, a value the database refuses, or a
-- transient failure that outlasted its bound): recorded in the same transaction that claims the update in
-- processed_updates, so a redelivery is answered 200 without running again, and kept until
-- `python -m bot replay` applies them (and deletes the row in the same transaction) or someone deletes
-- them. body is the update as received, as text: jsonb would refuse a message containing \u0000, which
-- is one of the things that end here.
CREATE TABLE dead_letters (
    bot_id    bigint NOT NULL,
    update_id bigint NOT NULL,
    chat      text,
    kind      text,
    body      text NOT NULL,
    error     text NOT NULL,
    traceback text NOT NULL,
    attempts  integer NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_id, update_id)
);
CREATE INDEX dead_letters_failed_at ON dead_letters (bot_id, failed_at);
