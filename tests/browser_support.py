"""A real Chromium (Debian's, scripts/install-chromium.sh) driven by Playwright, with a CDP
virtual WebAuthn authenticator standing in for an employee's security key, and the
directory where tests keep their screenshots."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("CUSTODY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
"""Screenshots and other things a person looks at after a run (not committed)."""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium: scripts/install-chromium.sh installs Debian's")
    return path


def artifacts(topic: str) -> Path:
    """A fresh directory for ``topic``'s artifacts, named on stderr so the run shows where they are."""
    out = ARTIFACTS / topic
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"\n{topic}: screenshots in {out}", file=sys.stderr)
    return out


@contextmanager
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless (Playwright never downloads a browser here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path())
        try:
            yield b
        finally:
            b.close()


def security_key(page: Any) -> str:
    """Attach a virtual FIDO2 security key (CTAP2 over USB, with a PIN it always says was
    entered, touched automatically) to ``page``'s tab. Returns its authenticator id."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    options = {
        "protocol": "ctap2",
        "transport": "usb",
        "hasResidentKey": True,
        "hasUserVerification": True,
        "isUserVerified": True,
        "automaticPresenceSimulation": True,
    }
    page._custody_cdp = cdp  # kept alive with the page
    return str(cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})["authenticatorId"])


ASSERT_JS = """async ([digest, rpId, ids]) => {
  const b64 = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)))
    .replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
  const unb64 = (t) => Uint8Array.from(atob(t.replace(/-/g, "+").replace(/_/g, "/")
    + "===".slice((t.length + 3) % 4)), (c) => c.charCodeAt(0));
  const cred = await navigator.credentials.get({publicKey: {
    challenge: Uint8Array.from(digest.match(/../g), (h) => parseInt(h, 16)), rpId,
    allowCredentials: ids.map((id) => ({type: "public-key", id: unb64(id)})), userVerification: "required"}});
  return {credential_id: b64(cred.rawId), authenticator_data: b64(cred.response.authenticatorData),
          client_data_json: b64(cred.response.clientDataJSON), signature: b64(cred.response.signature)};
}"""


def assertion(page: Any, digest: str, rp_id: str, credential_ids: list[str]) -> dict[str, str]:
    """What the security key signs for a page of ``page``'s current origin over the challenge
    ``digest`` (hex), as the console's script would send it."""
    result: dict[str, str] = page.evaluate(ASSERT_JS, [digest, rp_id, credential_ids])
    return result
