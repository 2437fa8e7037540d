-- Sending within Telegram's flood limits, shared by every process on this database.

-- Which chat a call goes to, for keeping a chat's calls in order and for its rate budget. Derived from
-- the payload, so queueing a reply inside the update's transaction does no extra work.
ALTER TABLE outbox ADD COLUMN chat_key text GENERATED ALWAYS AS (payload->>'chat_id') STORED;
CREATE INDEX outbox_chat_pending ON outbox (chat_key, id) WHERE sent_at IS NULL AND failed_at IS NULL;

-- One row per budget: '*' for the whole bot, else a chat id. Times are epoch seconds from the senders'
-- clocks. next_at is GCRA's "theoretical arrival time": a send is allowed once next_at minus the burst
-- allowance has passed, and moves next_at one interval on. paused_until is a 429's retry_after.
CREATE TABLE send_budget (
    key          text PRIMARY KEY,
    next_at      double precision NOT NULL DEFAULT 0,
    paused_until double precision NOT NULL DEFAULT 0
);
CREATE INDEX send_budget_paused ON send_budget (paused_until);

-- Take a slot in every budget the call needs, or in none: wait = 0 when taken; else the seconds until
-- the budget (or pause) named by blocked_by allows it; both NULL when an earlier call to the same chat is
-- still unsent (order within a chat). One call, so two processes never both take the last slot: the
-- rows are locked in key order (no deadlock between senders), checked, then moved on together.
CREATE FUNCTION reserve_send(
    p_call bigint, p_chat text, p_keys text[], p_intervals float8[], p_bursts float8[], p_now float8,
    OUT wait float8, OUT blocked_by text
) LANGUAGE plpgsql AS $$
BEGIN
    IF p_chat IS NOT NULL AND EXISTS (
        SELECT 1 FROM outbox
        WHERE chat_key = p_chat AND id < p_call AND sent_at IS NULL AND failed_at IS NULL
    ) THEN
        RETURN;
    END IF;
    INSERT INTO send_budget (key) SELECT unnest(p_keys) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM send_budget WHERE key = ANY (p_keys) ORDER BY key FOR UPDATE;
    SELECT greatest(b.paused_until, b.next_at - w.step * (w.burst - 1)) - p_now, b.key
    INTO wait, blocked_by
    FROM send_budget b JOIN unnest(p_keys, p_intervals, p_bursts) AS w (key, step, burst) USING (key)
    ORDER BY 1 DESC LIMIT 1;
    IF wait > 0 THEN
        RETURN;
    END IF;
    UPDATE send_budget b SET next_at = greatest(b.next_at, p_now) + w.step
    FROM unnest(p_keys, p_intervals) AS w (key, step) WHERE b.key = w.key;
    wait := 0;
    blocked_by := NULL;
END $$;

-- A 429: pause the chat until p_until. When another chat is paused already, or the call had no chat,
-- the limit hit is the bot's own, not one chat's: pause every send. Returns true for the whole bot.
CREATE FUNCTION pause_sends(p_chat text, p_until float8, p_now float8) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    everything boolean := p_chat IS NULL OR EXISTS (
        SELECT 1 FROM send_budget WHERE paused_until > p_now AND key <> '*' AND key <> p_chat
    );
BEGIN
    INSERT INTO send_budget AS b (key, paused_until)
    SELECT DISTINCT k, p_until
    FROM unnest(ARRAY[coalesce(p_chat, '*'), CASE WHEN everything THEN '*' END]) AS k
    WHERE k IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET paused_until = greatest(b.paused_until, EXCLUDED.paused_until);
    RETURN everything;
END $$;
