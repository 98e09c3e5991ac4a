"""Key origins: what an unquoted shell makes of `48'/1'/0'/2'` is refused before any money moves."""

from __future__ import annotations

import json
from pathlib import Path

from custody.bitcoin.keys import HARDENED, KeyOrigin
from tests.support import Custody, founders


def _stripped(spec: str) -> str:
    """What `sh` passes for an unquoted `a=[fp/48'/1'/0'/2']tpub...`: the quotes removed."""
    return spec.replace("'", "")


def _draft(custody: Custody, specs: list[str], *extra: str, script: str = "p2wsh") -> tuple[int, str, Path]:
    out = custody.home.parent / f"draft-{len(list(custody.home.parent.iterdir()))}.json"
    args = ["manifest", "draft", "--network", "regtest", "--script", script, *extra]
    for spec in specs:
        args += ["--founder", spec]
    result = custody(*args, "--out", str(out))
    return result.exit_code, result.stderr, out


def test_an_origin_the_shell_stripped_is_refused_with_the_reason(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "home")
    fs = founders()
    code, err, out = _draft(custody, [fs[0].spec, fs[1].spec, _stripped(fs[2].spec)])
    assert code == 2 and not out.exists()
    assert "founder-c" in err and "m/48/1/0/2" in err and "did the shell eat" in err
    assert "--allow-nonstandard-path" in err


def test_the_override_drafts_with_a_loud_warning(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "home")
    fs = founders()
    code, err, out = _draft(custody, [fs[0].spec, fs[1].spec, _stripped(fs[2].spec)], "--allow-nonstandard-path")
    assert code == 0 and out.exists()
    assert "NON-STANDARD KEY ORIGIN" in err and "founder-c" in err


def test_h_marks_hardened_steps_like_the_quote(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "home")
    fs = founders()
    with_h = [f.spec.replace("'", "h") for f in fs]
    code, err, out = _draft(custody, with_h)
    assert code == 0, err
    written = json.loads(out.read_text())
    assert [f["xpub"] for f in written["founders"]] == [str(f.account) for f in fs]  # the same keys as with '


def test_a_path_for_another_script_type_is_refused(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "home")
    p2wsh_keys = founders(script="p2wsh")  # m/48'/1'/0'/2' under a p2sh-p2wsh policy: BIP-48 wants /1'
    code, err, _ = _draft(custody, [f.spec for f in p2wsh_keys], script="p2sh-p2wsh")
    assert code == 2 and "m/48'/1'/0'/1'" in err
    code, err, _ = _draft(custody, [f.spec for f in p2wsh_keys], script="p2sh")
    assert code == 2 and "m/45'" in err
    code, err, _ = _draft(custody, [f.spec for f in founders(script="p2sh")], script="p2sh")
    assert code == 0, err
    no_origin = [f"{f.name}={f.account.xpub.serialize()}" for f in p2wsh_keys]
    code, err, _ = _draft(custody, no_origin)
    assert code == 2 and "no origin" in err


def test_keygen_offers_every_script_type_at_its_standard_path(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "home")
    expected = {"p2wsh": "/48'/1'/0'/2']", "p2sh-p2wsh": "/48'/1'/0'/1']", "p2sh": "/45']"}
    for script, path in expected.items():
        key = tmp_path / f"{script}.key"
        result = custody("keygen", "a", "--out", str(key), "--script", script, "--json")
        assert result.exit_code == 0, result.output
        assert path in json.loads(result.stdout)["xpub"]


def test_manifest_sign_refuses_an_origin_its_key_file_does_not_derive(tmp_path: Path) -> None:
    """The key file knows its derivation: the founder whose origin the manifest altered refuses."""
    custody = Custody(tmp_path / "home")
    key = tmp_path / "mine.key"
    made = custody("keygen", "founder-c", "--out", str(key), "--json")
    assert made.exit_code == 0, made.output
    mine = json.loads(made.stdout)["xpub"]
    fs = founders()
    code, err, out = _draft(
        custody, [fs[0].spec, fs[1].spec, _stripped(f"founder-c={mine}")], "--allow-nonstandard-path"
    )
    assert code == 0, err
    before = out.read_bytes()
    signed = custody("manifest", "sign", str(out), "--key", str(key), "--yes")
    assert signed.exit_code == 2 and "your key file derives it at" in signed.stderr
    assert out.read_bytes() == before  # no signature added
    # Another fingerprint, the standard path, the same key: refused too (another master's origin).
    other = KeyOrigin(b"\x00\x00\x00\x01", (48 + HARDENED, 1 + HARDENED, HARDENED, 2 + HARDENED))
    forged = f"founder-c={other}{mine.split(']', 1)[1]}"
    code, err, out = _draft(custody, [fs[0].spec, fs[1].spec, forged])
    assert code == 0, err
    signed = custody("manifest", "sign", str(out), "--key", str(key), "--yes")
    assert signed.exit_code == 2 and "your key file derives it at" in signed.stderr
