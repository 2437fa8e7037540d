-- When a group becomes a supergroup (a new chat id), its session rows are merged into the new chat's and
-- each old row stays behind as a forward: data IS NULL, moved_to = the new key, expiring once Telegram
-- can no longer redeliver an update for the old id (24 h). A late update for the old id finds the forward
-- in the same locking SELECT that reads any session, so it costs no extra query, and is applied to the
-- new chat's session instead of starting a count nobody will ever see. The sweeper's prune of expired
-- sessions removes forwards too.
ALTER TABLE sessions ADD COLUMN moved_to text;
