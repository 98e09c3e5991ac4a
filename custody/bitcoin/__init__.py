"""Pure Bitcoin primitives: networks, amounts, bech32, BIP-32 keys, descriptors, destinations,
scripts, transaction building and PSBTs. Nothing here touches the store, the chain or a file."""
