-- Files queued with a call (issue 18): the bytes wait in the call's own row, written in the update's
-- transaction with it, and are dropped (set to NULL) once the call is sent or given up on, so only calls
-- still waiting hold any. One value per call: its files as a MessagePack array of [name, filename, data]
-- (bot/files.py, `pack_uploads`); the call's payload names each as "attach://<name>". PostgreSQL keeps a
-- large value out of line (TOAST), so the row's updates (leases, attempts) do not copy the bytes, and the
-- queries that claim calls return only whether a call has files: the sender reads them right before
-- sending, one call at a time.
ALTER TABLE outbox ADD COLUMN files bytea;

-- During a rolling deploy, a process of the previous release that claims a call with files sends its
-- payload without them ("attach://file0" names nothing): Telegram answers 400 and that call is given up
-- on. Calls without files, all that release could queue, are unaffected.
