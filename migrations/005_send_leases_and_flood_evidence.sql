-- One Bot API answer can't silence the bot (issue 16): a lease that covers each call from the moment it
-- is sent, and a bot-wide 429 pause only on evidence, and only for seconds.

-- Each claim of a call takes the next lease number, and a sender asks to send with the one it holds: a
-- sender whose lease ran out and was taken over learns it before sending, not after.
ALTER TABLE outbox ADD COLUMN lease_no integer NOT NULL DEFAULT 0;

-- The evidence for a bot-wide pause: when each chat last got a 429 (limited_at), and on the whole bot's
-- row ('*') a meter of its sends: `sends`, decayed by e^(-seconds) since `sends_at`, plus one per send,
-- which is about how many sends the last second held.
ALTER TABLE send_budget
    ADD COLUMN limited_at double precision NOT NULL DEFAULT 0,
    ADD COLUMN sends      double precision NOT NULL DEFAULT 0,
    ADD COLUMN sends_at   double precision NOT NULL DEFAULT 0;
CREATE INDEX send_budget_limited ON send_budget (limited_at) WHERE limited_at > 0;

-- A bot-wide pause taken by the old rule (any two paused chats, for the whole retry_after, up to an
-- hour) is not one the new rule would take: it ends now rather than at the next start.
UPDATE send_budget SET paused_until = 0 WHERE key = '*';

-- Right before a send: if the sender still holds the call (its lease number, and still unsent), take a
-- slot in every budget or in none, and renew the lease from now, so that it covers the call from the
-- moment it is sent. A call that may not go now is put back in the same statement, due when it may:
-- verdict 'wait' (wait seconds, for the budget blocked_by), 'behind' (an earlier call to the same chat
-- is unsent: due as soon as it is its chat's first) or 'lost' (another sender holds it, or it was
-- settled). Rows are locked call first, then budgets in key order: no deadlock between senders.
CREATE FUNCTION reserve_send(
    p_call bigint, p_lease_no integer, p_chat text, p_keys text[], p_intervals float8[], p_bursts float8[],
    p_now float8, p_lease float8,
    OUT verdict text, OUT wait float8, OUT blocked_by text
) LANGUAGE plpgsql AS $$
BEGIN
    -- The row lock also holds off a sweeper claiming the call at this moment; it then finds it leased.
    PERFORM 1 FROM outbox
    WHERE id = p_call AND lease_no = p_lease_no AND sent_at IS NULL AND failed_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        verdict := 'lost';
        RETURN;
    END IF;
    IF p_chat IS NOT NULL AND EXISTS (
        SELECT 1 FROM outbox
        WHERE chat_key = p_chat AND id < p_call AND sent_at IS NULL AND failed_at IS NULL
    ) THEN
        UPDATE outbox SET lease_until = to_timestamp(p_now) WHERE id = p_call;
        verdict := 'behind';
        wait := 0;
        RETURN;
    END IF;
    INSERT INTO send_budget (key) SELECT unnest(p_keys) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM send_budget WHERE key = ANY (p_keys) ORDER BY key FOR UPDATE;
    SELECT greatest(b.paused_until, b.next_at - w.step * (w.burst - 1)) - p_now, b.key
    INTO wait, blocked_by
    FROM send_budget b JOIN unnest(p_keys, p_intervals, p_bursts) AS w (key, step, burst) USING (key)
    ORDER BY 1 DESC LIMIT 1;
    IF wait > 0 THEN
        UPDATE outbox SET lease_until = to_timestamp(p_now + wait) WHERE id = p_call;
        verdict := 'wait';
        RETURN;
    END IF;
    -- exp() of a large negative number is an underflow error in PostgreSQL: a minute decays it enough.
    UPDATE send_budget b SET
        next_at = greatest(b.next_at, p_now) + w.step,
        sends = CASE WHEN b.key = '*' THEN b.sends * exp(-least(greatest(p_now - b.sends_at, 0), 60)) + 1
            ELSE b.sends END,
        sends_at = CASE WHEN b.key = '*' THEN greatest(b.sends_at, p_now) ELSE b.sends_at END
    FROM unnest(p_keys, p_intervals) AS w (key, step) WHERE b.key = w.key;
    UPDATE outbox SET lease_until = to_timestamp(p_now + p_lease) WHERE id = p_call;
    verdict := 'go';
    wait := 0;
    blocked_by := NULL;
END $$;

-- A 429 for a call to p_chat: pause that chat until p_until. Only when at least p_chats chats got a 429
-- within p_within seconds, while the whole bot sent at least p_rate sends a second, is the limit taken
-- to be the bot's own: then every send pauses too, until p_until but at most p_max seconds. Returns
-- true for the whole bot.
CREATE FUNCTION pause_sends(
    p_chat text, p_until float8, p_now float8, p_chats integer, p_within float8, p_rate float8, p_max float8
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    everything boolean;
BEGIN
    IF p_chat IS NOT NULL THEN
        INSERT INTO send_budget AS b (key, paused_until, limited_at) VALUES (p_chat, p_until, p_now)
        ON CONFLICT (key) DO UPDATE SET
            paused_until = greatest(b.paused_until, EXCLUDED.paused_until),
            limited_at = greatest(b.limited_at, EXCLUDED.limited_at);
    END IF;
    everything := (
        SELECT count(*) FROM send_budget WHERE key <> '*' AND limited_at > p_now - p_within
    ) >= p_chats AND coalesce((
        SELECT sends * exp(-least(greatest(p_now - sends_at, 0), 60)) FROM send_budget WHERE key = '*'
    ), 0) >= p_rate;
    IF everything THEN
        INSERT INTO send_budget AS b (key, paused_until) VALUES ('*', least(p_until, p_now + p_max))
        ON CONFLICT (key) DO UPDATE SET paused_until = greatest(b.paused_until, EXCLUDED.paused_until);
    END IF;
    RETURN everything;
END $$;

-- The previous release's reserve_send and pause_sends (003) stay for its processes still running during
-- a rolling deploy; nothing in this release calls them.
