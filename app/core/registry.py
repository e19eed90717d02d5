"""Imports every model module so that Base.metadata knows all tables (Alembic and tests use it)."""

from app.accounts import models as _accounts  # noqa: F401
from app.core.models import Base
from app.delivery import models as _delivery  # noqa: F401
from app.discovery import models as _discovery  # noqa: F401
from app.spaces import models as _spaces  # noqa: F401
from app.subscriptions import models as _subscriptions  # noqa: F401

metadata = Base.metadata
