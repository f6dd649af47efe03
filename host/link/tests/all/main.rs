//! braid-link's integration tests: one binary, modules per area.

mod delivery;
mod handshake;
mod pair;
mod props;
mod security;
