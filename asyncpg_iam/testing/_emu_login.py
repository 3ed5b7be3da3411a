"""Decide a login: the keys and IAM users the emulator knows, and the verdict on a password.

`LoginChecker` holds the registered keys (and key sources), the users enabled for IAM from
Python, and the backend's role directory; `check()` turns a password into a `Login`: a token
verified as RDS (or DSQL) would, or the ordinary password of a user outside ``rds_iam``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from ._emu_roles import RDS_IAM_ROLE, RoleDirectory, RoleInfo, password_matches
from ._emu_verify import RegisteredKey, Verdict, verify_dsql_token, verify_token
from ._keys import AccessKeyLike

__all__ = ["KeySource", "Login", "LoginChecker", "decode_password", "looks_like_token"]


KeySource = Callable[[str], "AccessKeyLike | None"]


@dataclass(frozen=True, slots=True)
class Login:
    """The verdict on a password message, and how to log in to the backend if accepted."""

    verdict: Verdict
    # A user outside rds_iam logs in to the backend with its own password; None: as an IAM user.
    password: str | None = field(default=None, repr=False)
    # The role's verifier was unreadable: accept only if the backend asks for the password.
    backend_must_check: bool = False


def looks_like_token(password: str) -> bool:
    """Tell whether a password is shaped like an RDS IAM token (host:port/?...signed query)."""
    return "/?" in password and "X-Amz-Signature=" in password and "Action=" in password


def decode_password(payload: bytes) -> str | Verdict:
    """Return the password of a password message's body, or the refusal of a malformed one."""
    if not payload.endswith(b"\x00") or b"\x00" in payload[:-1]:
        return Verdict(False, "malformed_token", "the password message is not one string")
    try:
        return payload[:-1].decode("utf-8")
    except UnicodeDecodeError:
        return Verdict(False, "malformed_token", "the password is not UTF-8")


def _not_iam_enabled(verdict: Verdict, detail: str) -> Verdict:
    return Verdict(False, "user_not_iam_enabled", detail, verdict.access_key, verdict.token_age)


class _KeyBook(Mapping[str, RegisteredKey]):
    """The registered keys, then the key sources, as one read-only mapping."""

    def __init__(self, keys: dict[str, RegisteredKey], sources: list[KeySource]) -> None:
        self._keys = keys
        self._sources = sources

    def __getitem__(self, access_key: str) -> RegisteredKey:
        found = self._keys.get(access_key)
        if found is not None:
            return found
        for lookup in self._sources:
            key = lookup(access_key)
            if key is not None:
                return RegisteredKey(key.access_key, key.secret_key, key.session_token, None)
        raise KeyError(access_key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LoginChecker:
    """The emulator's verifier: which keys sign, which users may use IAM, and the verdicts."""

    def __init__(
        self,
        *,
        endpoint: str,
        region: str,
        endpoint_port: Callable[[], int],
        aliases: Iterable[str] = (),
        dsql: bool,
        accept_any_password: bool,
        max_clock_skew: float,
        iam_users: Iterable[str],
        roles: RoleDirectory,
    ) -> None:
        self._endpoint = endpoint
        self._aliases = tuple(aliases)
        self._region = region
        self._endpoint_port = endpoint_port
        self._dsql = dsql
        self._accept_any_password = accept_any_password
        self._max_clock_skew = max_clock_skew
        self._keys: dict[str, RegisteredKey] = {}
        self._key_sources: list[KeySource] = []
        self._keybook = _KeyBook(self._keys, self._key_sources)
        self._roles = roles
        self.iam_users: set[str] = set(iam_users)
        if dsql:
            self.iam_users.add("admin")
        for user in self.iam_users:
            roles.queue_grant(user)

    def rename(self, endpoint: str) -> None:
        """Accept tokens signed for `endpoint` (and no longer the old name)."""
        self._endpoint = endpoint

    # -- keys and users -----------------------------------------------------------------------

    def register_key(self, key: RegisteredKey) -> None:
        """Accept tokens signed with `key`."""
        self._keys[key.access_key] = key

    def add_key_source(self, lookup: KeySource) -> None:
        """Also accept tokens signed with keys `lookup` knows."""
        self._key_sources.append(lookup)

    def unregister_key(self, access_key: str) -> None:
        """Stop accepting tokens signed with this key."""
        self._keys.pop(access_key, None)

    def enable_iam_user(self, user: str) -> None:
        """Let `user` log in with tokens (the grant of rds_iam is queued)."""
        self.iam_users.add(user)
        self._roles.queue_grant(user)

    def disable_iam_user(self, user: str) -> None:
        """Stop `user` logging in with tokens (the revoke of rds_iam is queued)."""
        self.iam_users.discard(user)
        self._roles.queue_revoke(user)

    # -- verdicts -----------------------------------------------------------------------------

    async def check(self, password: str, *, user: str, now: dt.datetime) -> Login:
        """Decide a login of `user` with `password` at `now` (the emulator's shifted clock)."""
        if self._accept_any_password:
            return Login(Verdict(True, "ok", "accept_any_password: token not checked"))
        if self._dsql:
            return Login(self._check_dsql(password, user, now))
        return await self._check_rds(password, user, now)

    def _check_dsql(self, token: str, user: str, now: dt.datetime) -> Verdict:
        verdict = verify_dsql_token(
            token,
            user=user,
            endpoint=self._endpoint,
            region=self._region,
            keys=self._keybook,
            now=now,
            max_clock_skew=self._max_clock_skew,
        )
        if verdict.accepted and user not in self.iam_users:
            detail = f"user {user!r} is not enabled for IAM (enable_iam_user / AWS IAM GRANT)"
            return _not_iam_enabled(verdict, detail)
        return verdict

    async def _check_rds(self, password: str, user: str, now: dt.datetime) -> Login:
        tokenish = looks_like_token(password)
        info = None
        if user not in self.iam_users:
            info = await self._roles.lookup(user, with_verifier=not tokenish)
        if info is not None and not info.iam_member and not tokenish:
            return _check_ordinary_password(user, password, info, now)
        for endpoint in (self._endpoint, *self._aliases):
            verdict = verify_token(
                password,
                user=user,
                endpoint=endpoint,
                port=self._endpoint_port(),
                region=self._region,
                keys=self._keybook,
                now=now,
                max_clock_skew=self._max_clock_skew,
            )
            if verdict.reason != "wrong_host":
                if endpoint != self._endpoint:
                    detail = f"signed for the alias {endpoint}; {verdict.detail}"
                    verdict = dataclasses.replace(verdict, detail=detail)
                break
        if info is not None and not info.iam_member:
            detail = (
                f"user {user!r} is not a member of {RDS_IAM_ROLE} (GRANT {RDS_IAM_ROLE} TO "
                f"{user}, or enable_iam_user); the token itself: {verdict.reason}"
            )
            return Login(_not_iam_enabled(verdict, detail))
        return Login(verdict)


def _check_ordinary_password(user: str, password: str, info: RoleInfo, now: dt.datetime) -> Login:
    """Check the password of a user outside rds_iam, as PostgreSQL would."""
    if not info.verifier_known:
        detail = "password login of a user outside rds_iam, checked by the backend"
        return Login(Verdict(True, "ok", detail), password, backend_must_check=True)
    if not info.exists:
        return Login(Verdict(False, "password_mismatch", f"role {user!r} does not exist"))
    if info.valid_until is not None and info.valid_until < now:
        return Login(Verdict(False, "password_mismatch", f"the password of {user!r} has expired"))
    if not password_matches(info.verifier, user=user, password=password):
        detail = (
            f"the password does not match {user!r}'s (a user outside {RDS_IAM_ROLE} logs "
            "in with its ordinary password)"
        )
        return Login(Verdict(False, "password_mismatch", detail))
    return Login(Verdict(True, "ok", "password login of a user outside rds_iam"), password)
