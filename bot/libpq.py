"""libpq's URL parameters that asyncpg does not know, and what the bot does with each.

Providers hand out libpq connection URLs: Neon's default one ends in `?sslmode=require&channel_binding=
require`. asyncpg reads the parameters it knows (host, port, user, password, dbname, sslmode and the
other ssl* files, target_session_attrs, service, passfile, krbsrvname, gsslib) and sends every other one
to the server as a run-time setting, which the server refuses: `unrecognized configuration parameter
"channel_binding"`, before anything else happens. So the URL loses, once at start-up, the parameters
only libpq acts on, each with a note saying what that means for this bot; the few that would change
where or how securely it connects in a way asyncpg cannot follow are refused instead, naming the variable.
Parameters that are server settings (application_name, options, search_path...) pass through untouched.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import BotError

__all__ = ["UnsupportedParameter", "for_asyncpg"]

# libpq's client-side keywords (PostgreSQL's "Parameter Key Words") that asyncpg does not read, and why
# leaving each out is safe for the bot: {name: why}.
_LEFT_OUT = {
    "channel_binding": "asyncpg has no SCRAM channel binding; the connection is still encrypted as sslmode"
    " says (sslmode=verify-full with sslrootcert also proves the server's identity)",
    "connect_timeout": "the bot's own connection timeouts apply",
    "fallback_application_name": "the bot names its connections itself",
    "keepalives": "TCP keepalive tuning of libpq's own",
    "keepalives_idle": "TCP keepalive tuning of libpq's own",
    "keepalives_interval": "TCP keepalive tuning of libpq's own",
    "keepalives_count": "TCP keepalive tuning of libpq's own",
    "tcp_user_timeout": "TCP tuning of libpq's own",
    "sslcompression": "TLS compression, which modern servers refuse anyway",
    "sslsni": "asyncpg always sends the host name in TLS",
    "load_balance_hosts": "asyncpg tries the hosts in the order given",
    "gssencmode": "asyncpg does not use GSSAPI encryption",
    "sslcertmode": "asyncpg sends a client certificate when sslcert is given",
}
# Values of those that ask for something asyncpg cannot do: refused rather than quietly not done.
_CANNOT = {("gssencmode", "require"), ("sslcertmode", "require")}
# Parameters whose absence would change whom or where the bot connects to.
_REFUSED = {
    "hostaddr": "connect to the address given in host instead",
    "require_auth": "asyncpg cannot restrict the authentication methods it accepts",
    "requirepeer": "asyncpg cannot check the server process's user on a Unix socket",
}


class UnsupportedParameter(BotError, ValueError):
    """A libpq parameter asyncpg cannot honour and the bot must not drop; the message says which."""


def for_asyncpg(url: str) -> tuple[str, list[str]]:
    """`url` without the libpq-only parameters asyncpg would send to the server, and one note per
    parameter left out. The URL comes back unchanged when there is nothing to leave out."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept: list[tuple[str, str]] = []
    notes: list[str] = []
    for key, value in query:
        if key in _REFUSED:
            raise UnsupportedParameter(f"{key} is not supported ({_REFUSED[key]})")
        if (key, value) in _CANNOT:
            raise UnsupportedParameter(f"{key}={value} is not supported ({_LEFT_OUT[key]})")
        if key in _LEFT_OUT:
            notes.append(f"{key}={value} left out: {_LEFT_OUT[key]}")
        else:
            kept.append((key, value))
    if not notes:
        return url, []
    return urlunsplit(parts._replace(query=urlencode(kept))), notes
