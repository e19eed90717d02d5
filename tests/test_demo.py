"""The README's run command: `spacebell demo` delivers reminders by webhook and email, then ends by itself."""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port


def test_demo_delivers_email_and_webhooks_and_ends_by_itself(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--duration", "22", "--port", str(free_port()), "--data-dir", str(data)],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "120", "TERM": "dumb"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"demo finished: (\d+) webhooks and (\d+) emails delivered \((\d+) signatures verified", result.stdout)
    assert found, result.stdout[-3000:]
    webhooks, emails, verified = map(int, found.groups())
    assert webhooks >= 1 and verified >= webhooks
    assert emails >= 1
    mails = sorted((data / "mail").glob("*.eml"))
    assert len(mails) >= 2  # the confirmation, then at least one notice or reminder
    subjects = [
        str(email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["Subject"]) for p in mails
    ]
    assert any("onfirm" in s for s in subjects), subjects
    assert any("onfirm" not in s for s in subjects), subjects
