"""Signature bundles: signed, verified, tested before use, swapped atomically, rolled back.

    keys      Ed25519 publisher keys (several trusted at once for rotation), key ids
    manifest  the signed manifest: name, version, files with kind, size and SHA-256
    bundle    reading a bundle (hostile input) and writing one
    content   compile YARA, parse IOC lists, slow-rule check, canary
    pack      publisher side: a directory into a signed bundle
    fetch     feeds: HTTPS (conditional, bounded) or a local directory, index.json
    store     the state directory: active/previous links, state.json
    active    the engine's rules callable that follows the active bundle
    pipeline  the Refresher: fetch → verify → stage → check → swap → publish
    config    the [signatures] section
    cli       `sva sigs keygen|pack|verify|update|install|status|rollback`

See docs/signatures.md for the bundle format, the feed layout and the operator's guide.
"""
