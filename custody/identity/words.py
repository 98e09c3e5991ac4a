"""BIP-39 words for founder keys: 24 English words (256 bits of the OS's randomness and an
8-bit checksum) a founder backs up on paper or steel and can restore into a hardware signer.

The BIP-32 seed is PBKDF2-HMAC-SHA512 of the words (NFKD) with the salt ``"mnemonic"`` and
2048 rounds, 64 bytes; custody uses no BIP-39 passphrase (the key file's passphrase protects
the file; a second, forgettable secret would only add a way to lose the key). The same words
in a Coldcard, Trezor, Jade or Sparrow without a passphrase give the same master key and so
the same account xpub.

Words never leave this module except as the string handed to the caller to show once; error
messages name a word's position, never the word.
"""

from __future__ import annotations

import unicodedata

from mnemonic import Mnemonic

from custody.errors import InputError

WORDS = 24
SOURCE = "bip39"  # the key file header's seed_source for a key made from words
_ENGLISH = Mnemonic("english")
_VALID_COUNTS = (12, 15, 18, 21, 24)


def new_words() -> str:
    """24 new words from 256 bits of the OS's randomness (``secrets``)."""
    return _ENGLISH.generate(strength=256)


def normalize_words(text: str) -> str:
    """The words of ``text`` as BIP-39 spells them: NFKD, lower case, single spaces; a word may
    be given by its first four letters (unique in the English list, what devices accept).

    Raises InputError for a count other than 12/15/18/21/24, a word not in the English list
    (by position only), or a wrong checksum (a word mistyped or out of order).
    """
    words = unicodedata.normalize("NFKD", text).lower().split()
    if len(words) not in _VALID_COUNTS:
        raise InputError(f"BIP-39 words come in 12, 15, 18, 21 or 24; {len(words)} were given")
    expanded = []
    for position, word in enumerate(words, start=1):
        full = _ENGLISH.expand_word(word) if len(word) >= 4 else word
        if full not in _ENGLISH.wordlist:
            raise InputError(f"word {position} is not in the BIP-39 English list")
        expanded.append(full)
    phrase = " ".join(expanded)
    if not _ENGLISH.check(phrase):
        raise InputError("the words' checksum does not match: a word is mistyped or out of order")
    return phrase


def seed_from_words(text: str) -> bytes:
    """The 64-byte BIP-39 seed of the words (no passphrase). Raises InputError as
    :func:`normalize_words` does."""
    return Mnemonic.to_seed(normalize_words(text), passphrase="")
