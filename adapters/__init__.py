"""One package per transport. Each exposes a pure ``translate`` without importing its library."""
