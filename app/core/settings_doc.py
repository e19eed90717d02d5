"""Renders the settings as `.env.example` and as the README's configuration table (kept in sync by a test).

`python -m app.core.settings_doc --write` rewrites both files from app/core/settings.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET_LIKE = {"secret_key", "x_bearer_token", "smtp_username", "smtp_password"}
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(getattr(value, "value", value))


def env_example() -> str:
    lines = [
        "# Spacebell settings. Every variable is optional; the values shown are the defaults.",
        "# Copy to .env (read from the working directory) or set them in the environment.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        env = f"SPACEBELL_{name.upper()}"
        lines.append(f"# {field.description}")
        lines.append(f"# {env}=" if name in SECRET_LIKE else f"{env}={_default(name)}")
        lines.append("")
    return "\n".join(lines)


def readme_table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = _default(name)
        rows.append(f"| `SPACEBELL_{name.upper()}` | {f'`{default}`' if default else ''} | {field.description} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{readme_table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        (ROOT / ".env.example").write_text(env_example())
        readme = ROOT / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
    else:
        print(readme_table())
