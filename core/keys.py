"""Key issuing use cases: operator keys from the CLI, short-lived end-user keys from the API."""

from __future__ import annotations

from datetime import timedelta

from core.auth import AuthService, IssuedKey, Role, validate_user_id
from core.errors import InvalidRequestError
from core.tenancy import TenancyService


class KeyService:
    def __init__(self, auth: AuthService, tenancy: TenancyService) -> None:
        self.auth = auth
        self.tenancy = tenancy

    def create_key(self, role: Role, app: str | None, *, user: str | None = None,
                   name: str | None = None, ttl: timedelta | None = None) -> IssuedKey:
        """A new key. app keys need an app (created if new); user keys need an app and user;
        admin and finance keys without an app are operator-wide."""
        if role in (Role.APP, Role.USER) and not app:
            raise InvalidRequestError(f"a {role.value} key needs an app (--app NAME)")
        if role == Role.USER and not user:
            raise InvalidRequestError("a user key needs an end user (--user ID)")
        if role != Role.USER and user:
            raise InvalidRequestError("only user keys name an end user")
        app_id = self.tenancy.ensure_app(app)[0] if app else None
        end_user_id = None
        if user is not None and app_id is not None:
            end_user_id = self.tenancy.ensure_end_user(app_id, validate_user_id(user))
        key, pk, expires_at = self.auth.issue(role=role, app_id=app_id,
                                              end_user_id=end_user_id, name=name, ttl=ttl)
        return IssuedKey(key=key, key_pk=pk, role=role, app_name=app, end_user=user,
                         expires_at=expires_at)

    def issue_user_key(self, app_id: int, user: str, ttl: timedelta,
                       name: str | None = None) -> IssuedKey:
        end_user_id = self.tenancy.ensure_end_user(app_id, validate_user_id(user))
        key, pk, expires_at = self.auth.issue(role=Role.USER, app_id=app_id,
                                              end_user_id=end_user_id, name=name, ttl=ttl)
        return IssuedKey(key=key, key_pk=pk, role=Role.USER, app_name=None, end_user=user,
                         expires_at=expires_at)
