"""The emulator's view of the backend's roles: who is an IAM user, and password checks.

On RDS a database user logs in with IAM when it is a member of the ``rds_iam`` role (its
``pg_hba.conf`` has ``host all +rds_iam ... pam``); every other user logs in with its ordinary
password. The emulator asks the backend the same question over its own administrative
connection: `RoleDirectory` creates ``rds_iam`` (NOLOGIN) when missing, grants and revokes it
for the users enabled from Python, and looks a login's role up (membership and stored password
verifier) when the user is not one of those.

The throwaway cluster trusts loopback, so it would let any password in: a password login of a
non-IAM user is therefore checked here against the role's stored SCRAM-SHA-256 or MD5 verifier,
as PostgreSQL itself checks a cleartext password. Backends that do ask for a password check it
again when the relay logs in with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RDS_IAM_ROLE", "RoleDirectory", "RoleInfo", "password_matches"]

logger = logging.getLogger("asyncpg_iam.testing.emulator")

RDS_IAM_ROLE = "rds_iam"

# Membership through pg_auth_members only: superusers are not members of rds_iam by being
# superusers (pg_hba's `+rds_iam` uses the same rule; pg_has_role() would say they are).
_LOOKUP = """
WITH RECURSIVE granted(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = $1
    UNION
    SELECT m.roleid FROM pg_auth_members m JOIN granted g ON m.member = g.oid
)
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1),
       EXISTS (SELECT 1 FROM granted g JOIN pg_roles r ON r.oid = g.oid
               WHERE r.rolname = 'rds_iam' AND r.rolname <> $1)
"""
_VERIFIER = "SELECT rolpassword, rolvaliduntil FROM pg_authid WHERE rolname = $1"


@dataclass(frozen=True, slots=True)
class RoleInfo:
    """What the backend says about a login's role.

    `verifier_known` is false when the administrative role cannot read ``pg_authid`` (not a
    superuser): the password is then left to the backend to check.
    """

    exists: bool
    iam_member: bool
    verifier_known: bool = False
    verifier: str | None = field(default=None, repr=False)
    valid_until: dt.datetime | None = None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def password_matches(verifier: str | None, *, user: str, password: str) -> bool:
    """Check a cleartext `password` against a stored ``rolpassword`` as PostgreSQL does."""
    if not verifier:
        return False
    if verifier.startswith("SCRAM-SHA-256$"):
        try:
            iterations_salt, keys = verifier[len("SCRAM-SHA-256$") :].split("$", 1)
            iterations, salt = iterations_salt.split(":", 1)
            stored_key, _server_key = keys.split(":", 1)
            salted = hashlib.pbkdf2_hmac(
                "sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations)
            )
        except ValueError:
            return False
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        expected = base64.b64decode(stored_key)
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), expected)
    if verifier.startswith("md5") and len(verifier) == 35:
        digest = hashlib.md5((password + user).encode("utf-8")).hexdigest()  # noqa: S324
        return hmac.compare_digest("md5" + digest, verifier)
    return False


class RoleDirectory:
    """The backend's roles as the emulator needs them, over one administrative connection.

    Grants and revokes asked for from synchronous code (`enable_iam_user`) are queued and
    applied, in order, before the next look-up, so a login never sees a stale membership.
    Failures to reach the backend are logged at DEBUG and treated as "not a member".
    """

    def __init__(
        self, *, host: str, port: int, user: str, password: str | None, timeout: float = 10.0
    ) -> None:
        self._host = host
        self._port = port
        self._user = user
        self._password = password
        self._timeout = timeout
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._pending: list[tuple[bool, str]] = []
        self._granted: set[str] = set()

    def queue_grant(self, user: str) -> None:
        """Grant ``rds_iam`` to `user` before the next look-up (if the role exists then)."""
        self._pending.append((True, user))

    def queue_revoke(self, user: str) -> None:
        """Revoke ``rds_iam`` from `user` before the next look-up."""
        self._pending.append((False, user))

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        import asyncpg

        self._conn = await asyncpg.connect(
            host=self._host,
            port=self._port,
            user=self._user,
            password=self._password,
            database="postgres",
            ssl=False,
            timeout=self._timeout,
        )
        return self._conn

    async def _apply_pending(self, conn: Any) -> None:
        import asyncpg

        while self._pending:
            grant, user = self._pending.pop(0)
            if user == RDS_IAM_ROLE:
                continue
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user)
            if not exists:
                continue
            if grant:
                row = await conn.fetchrow(_LOOKUP, user)
                if row[1]:
                    continue  # a member already (granted by SQL): not ours to revoke later
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(f"GRANT {RDS_IAM_ROLE} TO {_quote_ident(user)}")
                    self._granted.add(user)
            else:
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(f"REVOKE {RDS_IAM_ROLE} FROM {_quote_ident(user)}")
                self._granted.discard(user)

    async def setup(self) -> None:
        """Create the ``rds_iam`` role (NOLOGIN) unless it exists, and apply queued grants."""
        import asyncpg

        async with self._lock:
            try:
                conn = await self._connection()
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_roles WHERE rolname = $1", RDS_IAM_ROLE
                )
                if not exists:
                    with contextlib.suppress(asyncpg.DuplicateObjectError):
                        await conn.execute(f"CREATE ROLE {RDS_IAM_ROLE} NOLOGIN")
                await self._apply_pending(conn)
            except Exception as exc:  # best effort: the backend may be down or read-only
                logger.debug("cannot set up the rds_iam role on the backend: %r", exc)
                self._drop()

    async def apply(self) -> None:
        """Apply queued grants and revokes now (`ensure_role` calls it after creating a role)."""

        async with self._lock:
            try:
                await self._apply_pending(await self._connection())
            except Exception as exc:  # best effort: the backend may be down or read-only
                logger.debug("cannot apply rds_iam grants on the backend: %r", exc)
                self._drop()

    async def create_login_role(self, user: str, *, password: str | None) -> None:
        """Create a LOGIN role `user` (with `password`) unless it exists; errors propagate."""
        import asyncpg

        async with self._lock:
            conn = await self._connection()
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user)
            if not exists:
                sql = f"CREATE ROLE {_quote_ident(user)} LOGIN"
                if password is not None:
                    sql += " PASSWORD '" + password.replace("'", "''") + "'"
                with contextlib.suppress(asyncpg.DuplicateObjectError):
                    await conn.execute(sql)

    async def ensure_dsql_admin(self, *, password: str | None) -> None:
        """Create DSQL's ``admin`` role with CREATE on schema public, unless it exists.

        Best effort, like `setup`: a backend that cannot be reached is reported at login.
        """
        try:
            await self.create_login_role("admin", password=password)
            async with self._lock:
                conn = await self._connection()
                await conn.execute("GRANT CREATE, USAGE ON SCHEMA public TO admin")
        except Exception as exc:
            logger.debug("cannot create DSQL's admin role on the backend: %r", exc)
            self._drop()

    async def lookup(self, user: str, *, with_verifier: bool) -> RoleInfo:
        """Return whether `user` exists and is a member of ``rds_iam``, and its verifier."""
        import asyncpg

        async with self._lock:
            try:
                conn = await self._connection()
                await self._apply_pending(conn)
                row = await conn.fetchrow(_LOOKUP, user)
                exists, member = bool(row[0]), bool(row[1])
                if member or not with_verifier or not exists:
                    return RoleInfo(exists, member)
                try:
                    secret = await conn.fetchrow(_VERIFIER, user)
                except asyncpg.InsufficientPrivilegeError:
                    return RoleInfo(exists, member)
                return RoleInfo(exists, member, True, secret[0], secret[1])
            except Exception as exc:  # best effort: the backend may be down or read-only
                logger.debug("cannot look role %s up on the backend: %r", user, exc)
                self._drop()
                return RoleInfo(exists=True, iam_member=False)

    async def aclose(self) -> None:
        """Revoke the grants made here (the backend may outlive this emulator) and disconnect."""

        async with self._lock:
            self._pending = [(False, user) for user in sorted(self._granted)]
            conn, self._conn = self._conn, None
            if conn is None or conn.is_closed():
                self._pending.clear()
                return
            try:
                await asyncio.wait_for(self._apply_pending(conn), self._timeout)
            except Exception as exc:  # best effort: the backend may be down or read-only
                logger.debug("cannot revoke rds_iam grants on the backend: %r", exc)
            finally:
                self._pending.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), self._timeout)
                if not conn.is_closed():
                    conn.terminate()
